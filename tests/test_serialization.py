"""Tests of d2r_sb3.serialization: the safe policy format, SB3 zips and zoo log folders (real MT10 envs)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shlex
import shutil
import zipfile
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch as th
import yaml
from helpers import TINY_D2R
from safetensors.torch import load_file, save_file
from torch import nn

from d2r_sb3 import D2RSAC, MultiTaskPolicy, MultiTaskSAC, make_mt_env
from d2r_sb3.common.policies import squashed_gaussian
from d2r_sb3.registry import ALGOS
from d2r_sb3.serialization import (
    POLICY_CONFIG_FILE,
    POLICY_WEIGHTS_FILE,
    RUN_BEST_POLICY_DIR,
    RUN_POLICY_DIR,
    LoadedPolicy,
    ModelNotFoundError,
    PickleNotAllowedError,
    check_policy_folder,
    load_policy,
    resolve_model,
    save_policy,
    write_safe_policy,
)

CONTRACT_KEYS = {
    "format_version",
    "library",
    "library_version",
    "algo",
    "policy_class",
    "policy_kwargs",
    "observation_space",
    "action_space",
    "num_tasks",
    "task_names",
    "env_kwargs",
    "metadata",
}


def tiny_d2r(env: Any, seed: int = 0) -> D2RSAC:
    return D2RSAC(
        "D2RPolicy",
        env,
        policy_kwargs=TINY_D2R,
        batch_size=20,
        learning_starts=100,
        buffer_size=1000,
        seed=seed,
    )


@pytest.fixture(scope="module")
def env():
    env = make_mt_env("MT10", seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def model(env) -> D2RSAC:
    model = tiny_d2r(env)
    model.learn(200)  # 20 vector steps, 10 of them with gradient updates
    return model


@pytest.fixture(scope="module")
def observations(env) -> np.ndarray:
    """Real MT10 observations of every task (a few steps of random actions)."""
    rng = np.random.default_rng(0)
    batches = [env.reset()]
    for _ in range(3):
        obs, *_ = env.step(rng.uniform(-1, 1, (env.num_envs, 4)).astype(np.float32))
        batches.append(obs)
    return np.concatenate(batches)


def deterministic_actions(predictor: Any, obs: np.ndarray) -> np.ndarray:
    return predictor.predict(obs, deterministic=True)[0]


class Payload:
    """Unpickling this runs ``touch <marker>``, as a crafted SB3 zip would run anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def rewrite_zip_data(source: Path, target: Path, change: Any) -> Path:
    """A copy of the SB3 zip ``source`` whose ``data`` JSON is replaced by ``change(data)``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            content = old.read(name)
            if name == "data":
                content = json.dumps(change(json.loads(content))).encode()
            new.writestr(name, content)
    return target


def crafted_zip(source: Path, target: Path, marker: Path) -> Path:
    """An SB3 zip whose every pickled entry of ``data`` runs the payload when unpickled."""
    payload = base64.b64encode(pickle.dumps(Payload(marker))).decode()

    def poison(data: dict[str, Any]) -> dict[str, Any]:
        for value in data.values():
            if isinstance(value, dict) and ":serialized:" in value:
                value[":serialized:"] = payload
        return data

    return rewrite_zip_data(source, target, poison)


def refuse_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something was unpickled")

    for module, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (cloudpickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)


# --- safe format -----------------------------------------------------------------------------------------
def test_safe_round_trip_gives_identical_actions(model, env, observations, tmp_path):
    folder = save_policy(model, tmp_path / "policy", metadata={"note": "round trip"})
    assert sorted(p.name for p in folder.iterdir()) == [POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE]

    config = json.loads((folder / POLICY_CONFIG_FILE).read_text())
    assert CONTRACT_KEYS <= set(config)
    assert config["format_version"] == 1 and config["library"] == "d2r_sb3"
    assert (config["algo"], config["policy_class"], config["num_tasks"]) == ("d2r", "D2RPolicy", 10)
    assert config["task_names"] == env.task_names
    assert config["env_kwargs"] == env.env_kwargs()
    assert config["metadata"] == {"note": "round trip", "num_timesteps": 200}
    assert config["policy_kwargs"]["module_dim"] == 16 and "optimizer_class" not in config["policy_kwargs"]
    assert config["observation_space"]["shape"] == [49] and "-inf" in config["observation_space"]["low"]

    loaded = load_policy(folder)
    assert isinstance(loaded, LoadedPolicy)
    assert (loaded.algo, loaded.task_names, loaded.num_tasks) == ("d2r", env.task_names, 10)
    assert loaded.env_kwargs == env.env_kwargs()
    assert not loaded.policy.training and not loaded.policy.actor.training
    assert loaded.observation_space == model.observation_space
    np.testing.assert_array_equal(
        deterministic_actions(loaded, observations), deterministic_actions(model, observations)
    )
    np.testing.assert_array_equal(
        loaded.predict(observations[3])[0], model.predict(observations[3], deterministic=True)[0]
    )
    th.testing.assert_close(loaded.route(observations).edges, model.policy.route(observations).edges)
    # The routing temperature (a buffer, not a parameter) is part of the actor's saved state too.
    th.testing.assert_close(
        loaded.policy.actor.net.route_temperature, model.policy.actor.net.route_temperature
    )
    assert "D2RPolicy" in repr(loaded) and "'d2r'" in repr(loaded)
    # policy.json and policy.safetensors given as files load the same folder.
    for path in (folder / POLICY_CONFIG_FILE, folder / POLICY_WEIGHTS_FILE):
        np.testing.assert_array_equal(
            deterministic_actions(load_policy(path), observations),
            deterministic_actions(loaded, observations),
        )


def test_safe_load_never_unpickles(model, observations, tmp_path, monkeypatch):
    folder = save_policy(model, tmp_path / "policy")
    model.save(tmp_path / "model.zip")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something was unpickled")

    for module, name in [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (cloudpickle, "loads"),
        (cloudpickle, "load"),
        (th, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    loaded = load_policy(folder)
    np.testing.assert_array_equal(
        deterministic_actions(loaded, observations), deterministic_actions(model, observations)
    )
    # Control: the zip path does unpickle (when allowed), so the patches above are effective.
    with pytest.raises(AssertionError, match="unpickled"):
        load_policy(tmp_path / "model.zip", allow_pickle=True)
    # By default it is refused before anything is unpickled.
    with pytest.raises(PickleNotAllowedError, match="unpickl"):
        load_policy(tmp_path / "model.zip")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_weights_give_clear_errors(model, tmp_path, damage):
    folder = save_policy(model, tmp_path / "policy")
    weights = folder / POLICY_WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=r"policy\.safetensors is corrupted.*SHA-256"):
        load_policy(folder)
    # Without the checksum the safetensors header itself is checked.
    config = json.loads((folder / POLICY_CONFIG_FILE).read_text())
    del config["weights_sha256"]
    (folder / POLICY_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"policy\.safetensors is not a valid safetensors file"):
        load_policy(folder)


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / POLICY_CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / POLICY_CONFIG_FILE).write_text(json.dumps(config))


def test_missing_or_inconsistent_files_give_clear_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither policy.json"):
        load_policy(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither an SB3 .zip nor a safe policy file"):
        load_policy(tmp_path / "notes.txt")

    folder = save_policy(model, tmp_path / "policy")
    original = (folder / POLICY_CONFIG_FILE).read_text()
    (folder / POLICY_WEIGHTS_FILE).rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=r"policy\.safetensors does not exist"):
        load_policy(folder)
    (tmp_path / "moved.safetensors").rename(folder / POLICY_WEIGHTS_FILE)

    cases = [
        (dict(policy_class=None), "lacks the keys \\['policy_class'\\]"),
        (dict(format_version=2), "format_version=2"),
        (dict(policy_class="os.system"), "unknown policy_class 'os.system'"),
        (
            dict(policy_kwargs={**json.loads(original)["policy_kwargs"], "module_dim": 32}),
            "does not match the D2RPolicy",
        ),
        (dict(policy_kwargs={"num_tasks": 10, "no_such_argument": 1}), "cannot build D2RPolicy"),
        (dict(observation_space={"shape": [49]}), "observation_space must be"),
    ]
    for changes, message in cases:
        (folder / POLICY_CONFIG_FILE).write_text(original)
        edit_config(folder, **changes)
        with pytest.raises(ValueError, match=message):
            load_policy(folder)
    (folder / POLICY_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_policy_folder(folder)


def test_save_rejects_bad_input(model, tmp_path):
    with pytest.raises(TypeError, match="MultiTaskSAC/D2RSAC model or a MultiTaskPolicy"):
        save_policy(nn.Linear(2, 2), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown algo 'sac'"):
        save_policy(model, tmp_path, algo="sac")
    with pytest.raises(ValueError, match="plain JSON"):
        save_policy(model, tmp_path, metadata={"success": float("nan")})


# --- SB3 zips and zoo log folders --------------------------------------------------------------------------
def test_zip_and_zoo_log_folder(model, env, observations, tmp_path):
    run = tmp_path / "logs" / "d2r" / "MT10-rand_1"
    (run / "MT10-rand").mkdir(parents=True)
    model.save(run / "MT10-rand.zip")
    shutil.copy(run / "MT10-rand.zip", run / "rl_model_100_steps.zip")
    (run / "MT10-rand" / "env_kwargs.yml").write_text(yaml.safe_dump(env.env_kwargs()))
    tiny_d2r(env, seed=1).save(run / "best_model.zip")  # another network, so load_best is visible

    expected = deterministic_actions(model, observations)
    for source in (run, run / "MT10-rand.zip", run / "rl_model_100_steps.zip"):
        with pytest.raises(PickleNotAllowedError, match="needs|unpickl"):
            load_policy(source)
        loaded = load_policy(source, allow_pickle=True)
        assert loaded.algo == "d2r" and loaded.task_names == env.task_names
        assert loaded.env_kwargs == env.env_kwargs()
        assert isinstance(loaded.model, D2RSAC) and loaded.model.replay_buffer.buffer_size == 1
        assert loaded.metadata["num_timesteps"] == 200
        np.testing.assert_array_equal(deterministic_actions(loaded, observations), expected)

    with pytest.raises(PickleNotAllowedError, match="best_model.zip is an SB3 .zip"):
        load_policy(run, load_best=True)
    best = load_policy(run, load_best=True, allow_pickle=True)
    assert not np.array_equal(deterministic_actions(best, observations), expected)
    with pytest.raises(FileNotFoundError, match="best_model.zip does not exist"):
        load_policy(tmp_path / "logs" / "d2r", load_best=True)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    for allow_pickle in (False, True):
        with pytest.raises(ValueError, match="not an SB3 model zip"):
            load_policy(tmp_path / "broken.zip", allow_pickle=allow_pickle)


def test_make_env_rebuilds_the_training_env(model, tmp_path):
    loaded = load_policy(save_policy(model, tmp_path / "policy"))
    env = loaded.make_env(seed=3)
    try:
        assert (env.task_names, env.env_seed, env.max_episode_steps) == (loaded.task_names, 3, 200)
        actions, _ = loaded.predict(env.reset())
        assert actions.shape == (10, 4) and np.all(np.abs(actions) <= 1)
    finally:
        env.close()
    with pytest.raises(ValueError, match="expects 10 tasks"):
        loaded.make_env(benchmark=["reach", "push"])
    unknown = LoadedPolicy(loaded.policy, "d2r", loaded.task_names, env_kwargs={}, source="somewhere")
    with pytest.raises(ValueError, match="env of this policy is unknown"):
        unknown.make_env()


# --- policies other than D2R -------------------------------------------------------------------------------
class TinyMLPActor(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, hidden: int, activation_fn: type[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(obs_dim, hidden), activation_fn(), nn.Linear(hidden, 2 * action_dim)
        )

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        mean, log_std = self.body(obs).chunk(2, dim=-1)
        return squashed_gaussian(mean, log_std, deterministic, with_log_prob=False)[0]


class TinyMLPPolicy(MultiTaskPolicy):
    """A plain (non-routing) MultiTaskPolicy with a torch.nn class among its constructor arguments."""

    def __init__(self, *args: Any, hidden: int = 8, activation_fn: type[nn.Module] = nn.ReLU, **kwargs: Any):
        self.hidden, self.activation_fn = hidden, activation_fn
        super().__init__(*args, **kwargs)

    def make_actor(self) -> nn.Module:
        return TinyMLPActor(self.obs_dim, self.action_dim, self.hidden, self.activation_fn)

    def make_critic(self) -> nn.Module:
        return nn.Linear(self.obs_dim + self.action_dim, self.n_critics)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            **super()._get_constructor_parameters(),
            "hidden": self.hidden,
            "activation_fn": self.activation_fn,
        }


def test_plain_policy_round_trip(env, observations, tmp_path, monkeypatch):
    policy = TinyMLPPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, num_tasks=10, activation_fn=nn.Tanh
    )
    with pytest.raises(ValueError, match="TinyMLPPolicy has no registered alias"):
        save_policy(policy, tmp_path / "unregistered")

    monkeypatch.setitem(MultiTaskSAC.policy_aliases, "TinyMLPPolicy", TinyMLPPolicy)
    folder = save_policy(policy, tmp_path / "policy", env_kwargs=env.env_kwargs())
    config = json.loads((folder / POLICY_CONFIG_FILE).read_text())
    assert config["algo"] is None and config["policy_class"] == "TinyMLPPolicy"
    assert config["policy_kwargs"]["activation_fn"] == {"torch.nn": "Tanh"}
    assert config["task_names"] == env.task_names  # from env_kwargs["benchmark"]
    assert "num_timesteps" not in config["metadata"]

    loaded = load_policy(folder)
    assert isinstance(loaded.policy.actor.body[1], nn.Tanh)
    np.testing.assert_array_equal(
        deterministic_actions(loaded, observations), deterministic_actions(policy, observations)
    )
    with pytest.raises(TypeError, match="does not route"):
        loaded.route(observations)


@pytest.mark.parametrize("algo", [name for name in ALGOS if name != "d2r"])
def test_registered_baselines_round_trip(algo, env, observations, tmp_path):
    algo_cls, alias = ALGOS[algo]
    if alias not in algo_cls.policy_aliases:
        pytest.skip(f"{alias} is not registered yet (d2r_sb3.baselines)")
    model = algo_cls(alias, env, batch_size=20, learning_starts=10, buffer_size=100, seed=0)
    model.save(tmp_path / f"{algo}.zip")
    expected = deterministic_actions(model, observations)
    for source in (save_policy(model, tmp_path / algo), tmp_path / f"{algo}.zip"):
        loaded = load_policy(source, allow_pickle=True)
        assert (loaded.algo, type(loaded.policy)) == (algo, type(model.policy))
        np.testing.assert_array_equal(deterministic_actions(loaded, observations), expected)


# --- safe by default: nothing is unpickled unless asked -----------------------------------------------------
def test_crafted_zip_payload_never_runs_without_allow_pickle(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model.save(tmp_path / "model.zip")
    marker = tmp_path / "MARKER"
    evil = crafted_zip(tmp_path / "model.zip", tmp_path / "evil" / "MT10-rand.zip", marker)
    for source in (evil, evil.parent, str(evil), "./evil", "evil/MT10-rand.zip"):
        with pytest.raises(PickleNotAllowedError) as info:
            load_policy(source)
        message = str(info.value)
        assert "unpickles" in message and "can run arbitrary code" in message
        assert "allow_pickle=True" in message and "--allow-pickle" in message
        assert "policy.json + policy.safetensors" in message
    assert not marker.exists()
    # Control: the payload is real, so opting in runs it (loading then fails on the bogus class).
    with pytest.raises(Exception):  # noqa: B017  (whatever the bogus objects make SB3 raise)
        load_policy(evil, allow_pickle=True)
    assert marker.exists()


def test_zoo_run_prefers_its_safe_files(model, env, observations, tmp_path, monkeypatch):
    run = tmp_path / "logs" / "d2r" / "MT10-rand_1"
    (run / "MT10-rand").mkdir(parents=True)
    model.save(run / "MT10-rand.zip")
    (run / "MT10-rand" / "env_kwargs.yml").write_text(yaml.safe_dump(env.env_kwargs()))
    best = tiny_d2r(env, seed=1)
    best.save(run / "best_model.zip")
    expected, expected_best = (
        deterministic_actions(model, observations),
        deterministic_actions(best, observations),
    )

    # A run with only SB3 zips: refused by default, with what to do; loads with allow_pickle.
    with pytest.raises(PickleNotAllowedError) as info:
        load_policy(run)
    message = str(info.value)
    assert "MT10-rand.zip is an SB3 .zip" in message and "can run arbitrary code" in message
    assert "--allow-pickle" in message and f"has no {run / RUN_POLICY_DIR}" in message
    assert "write_safe_policy" in message
    np.testing.assert_array_equal(
        deterministic_actions(load_policy(run, allow_pickle=True), observations), expected
    )

    # zoo/train.py's call: the final model from memory, best_model.zip's weights without unpickling.
    with monkeypatch.context() as blocked:
        refuse_unpickling(blocked)
        written = write_safe_policy(model, run, model_zip=run / "MT10-rand.zip")
    assert written == [run / RUN_POLICY_DIR, run / RUN_BEST_POLICY_DIR]
    config = json.loads((run / RUN_POLICY_DIR / POLICY_CONFIG_FILE).read_text())
    assert config["metadata"]["source_zip"] == "MT10-rand.zip" and config["metadata"]["num_timesteps"] == 200
    assert config["env_kwargs"] == env.env_kwargs() and config["algo"] == "d2r"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # Now the run loads without allow_pickle, and nothing is unpickled.
    with monkeypatch.context() as blocked:
        refuse_unpickling(blocked)
        blocked.setattr(th, "load", lambda *a, **k: pytest.fail("torch.load called"))
        final = load_policy(run)
        best_loaded = load_policy(run, load_best=True)
    assert final.model is None and final.origin == f"local folder {run / RUN_POLICY_DIR}"
    assert best_loaded.origin == f"local folder {run / RUN_BEST_POLICY_DIR}"
    assert final.task_names == env.task_names and final.env_kwargs == env.env_kwargs()
    np.testing.assert_array_equal(deterministic_actions(final, observations), expected)
    np.testing.assert_array_equal(deterministic_actions(best_loaded, observations), expected_best)

    # A best_model.zip replaced after the safe files were written: they are used, with a warning.
    tiny_d2r(env, seed=2).save(run / "best_model.zip")
    with pytest.warns(UserWarning, match="best_policy was written from an earlier best_model.zip"):
        load_policy(run, load_best=True)

    # Writing the safe files never runs a crafted best_model.zip either.
    marker = tmp_path / "MARKER"
    os.replace(crafted_zip(run / "best_model.zip", tmp_path / "crafted.zip", marker), run / "best_model.zip")
    assert write_safe_policy(model, run) == [run / RUN_POLICY_DIR, run / RUN_BEST_POLICY_DIR]
    assert not marker.exists()


def test_resolve_model_rule(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_policy(model, tmp_path / "me" / "safe-policy")
    (tmp_path / "me" / "zips-only").mkdir()
    (tmp_path / "me" / "zips-only" / "model.zip").write_bytes(b"PK")
    cases = {
        "hf://me/safe-policy": ("hub", True),  # hf:// always means the Hub
        "./me/safe-policy": ("local", True),
        str(tmp_path / "me"): ("local", True),
        "~/me/x": ("local", True),
        "me/safe-policy": ("local", False),  # owner/name with safe files: local
        "me/zips-only": ("hub", False),  # owner/name without safe files: the Hub (the folder is not used)
        "me/absent": ("hub", False),
        "logs/d2r/MT10-rand_1": ("local", False),
        "my_policy": ("local", False),
        "me/model.zip": ("local", False),
    }
    for name, (kind, explicit) in cases.items():
        location = resolve_model(name)
        assert (location.kind, location.explicit) == (kind, explicit), name
    assert resolve_model("me/zips-only").shadowed == Path("me/zips-only")
    assert resolve_model("me/absent").shadowed is None
    assert resolve_model(Path("me/zips-only")).kind == "local"  # a Path object is always local
    with pytest.raises(ValueError, match="expected hf://owner/name"):
        resolve_model("hf://not a repo")
    with pytest.raises(ModelNotFoundError, match="no such file or folder.*not a Hub repo id either"):
        load_policy("logs/d2r/MT10-rand_9")


# --- consistency checks at load ---------------------------------------------------------------------------
def test_policy_json_task_names_must_match_num_tasks(model, tmp_path):
    folder = save_policy(model, tmp_path / "policy")
    original = (folder / POLICY_CONFIG_FILE).read_text()
    names = json.loads(original)["task_names"]
    cases = [
        (dict(task_names=names[:9]), r"task_names has 9 entries but the policy has num_tasks=10"),
        (
            dict(task_names=[*names, "hammer-v3"]),
            r"task_names has 11 entries but the policy has num_tasks=10",
        ),
        (dict(num_tasks=9, task_names=names[:9]), r"num_tasks=9 but policy_kwargs.num_tasks=10"),
        (dict(task_names=[names[0]] * 10), r"task_names lists \['reach-v3'\] more than once"),
        (dict(task_names="reach-v3"), "task_names must be a list of strings"),
        (dict(num_tasks="10"), "num_tasks must be a positive integer"),
    ]
    for changes, message in cases:
        (folder / POLICY_CONFIG_FILE).write_text(original)
        edit_config(folder, **changes)
        for check in (load_policy, check_policy_folder):
            with pytest.raises(ValueError, match=message):
                check(folder)


def test_nonfinite_weights_are_refused_at_load(model, env, tmp_path):
    folder = save_policy(model, tmp_path / "policy")
    tensors = load_file(str(folder / POLICY_WEIGHTS_FILE))
    name = next(n for n, t in sorted(tensors.items()) if t.is_floating_point() and t.numel() > 1)
    tensors[name].view(-1)[1] = float("nan")
    save_file(tensors, str(folder / POLICY_WEIGHTS_FILE), metadata={"format": "pt"})
    edit_config(folder, weights_sha256=None)  # as if written by a tool that does not check
    with pytest.raises(ValueError, match=rf"tensor '{name}' holds NaN or infinite values; refusing to load"):
        load_policy(folder)

    broken = tiny_d2r(env, seed=3)
    with th.no_grad():
        broken.policy.actor.state_dict()[name].view(-1)[0] = float("inf")
    broken.save(tmp_path / "broken.zip")
    with pytest.raises(ValueError, match=rf"actor's tensor '{name}' holds NaN or infinite values"):
        load_policy(tmp_path / "broken.zip", allow_pickle=True)


def test_malformed_zips_give_clear_errors(model, tmp_path):
    model.save(tmp_path / "model.zip")
    empty = rewrite_zip_data(tmp_path / "model.zip", tmp_path / "empty.zip", lambda data: {})
    no_space = rewrite_zip_data(
        tmp_path / "model.zip",
        tmp_path / "no_space.zip",
        lambda data: {k: v for k, v in data.items() if k != "action_space"},
    )
    with zipfile.ZipFile(tmp_path / "no_data.zip", "w") as archive:
        archive.writestr("policy.pth", b"")
    cases = [
        (empty, r"not a complete SB3 model zip: its 'data' lacks \['policy_class', 'policy_kwargs'"),
        (no_space, r"its 'data' lacks \['action_space'\]"),
        (tmp_path / "no_data.zip", "not an SB3 model zip: it has no 'data' entry"),
    ]
    for path, message in cases:
        for allow_pickle in (False, True):  # checked before anything is unpickled
            with pytest.raises(ValueError, match=message) as info:
                load_policy(path, allow_pickle=allow_pickle)
            assert not isinstance(info.value, (KeyError, PickleNotAllowedError))
    # A key SB3 itself needs while rebuilding the model: still a ValueError, not a raw AttributeError.
    partial = rewrite_zip_data(
        tmp_path / "model.zip",
        tmp_path / "partial.zip",
        lambda data: {k: v for k, v in data.items() if k != "target_entropy"},
    )
    with pytest.raises(
        ValueError, match="not a complete SB3 model zip: loading it failed with AttributeError"
    ):
        load_policy(partial, allow_pickle=True)
