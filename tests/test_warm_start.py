"""Resume seeds and warm starts: ``zoo/train.py --write-seed SOURCE -o FILE`` and ``--warm-start PATH``.

Real files and real tiny runs: a D2R run on two Meta-World tasks (reach, drawer-close) with 20-step episodes and
the tiny test network, run in this process as its console script does.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch as th
import yaml
from helpers import TINY_D2R_FLAG, CommandResult, check_clean_error, check_ok, run_command
from safetensors import safe_open

from d2r_sb3 import D2RSAC, make_mt_env
from d2r_sb3.serialization import read_seed, seed_from_model, write_seed
from d2r_sb3.zoo import train as train_cli
from d2r_sb3.zoo.exp_manager import RunSetup

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process commands set threads

NAME = "custom-rand"
# 2 tasks: 200 env steps = 100 vector steps; updates after the 60-step warm-up: (200 - 60) / 2 = 70.
SOURCE_STEPS, SOURCE_UPDATES, LEARNING_STARTS = 200, 70, 60
HYPERPARAMS = ["batch_size:16", f"learning_starts:{LEARNING_STARTS}", "buffer_size:2000"]
FAST = "--env-kwargs max_episode_steps:20 --eval-freq 0 --final-eval-episodes 0 --num-threads 1 --verbose 0"


def run_flags(*hyperparams: str, algo: str = "d2r") -> list[str]:
    """The flags of the tiny runs (the tiny D2R network for d2r), with more ``--hyperparams`` items."""
    tiny = [TINY_D2R_FLAG] if algo == "d2r" else []
    return [
        *f"--algo {algo} --env reach,drawer-close --seed 0".split(),
        *("--hyperparams", *HYPERPARAMS, *tiny, *hyperparams),
        *FAST.split(),
    ]


RUN_FLAGS = run_flags()


def train(*args: str) -> CommandResult:
    return run_command("train", list(args))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of 200 env steps (its final model and one checkpoint)."""
    folder = tmp_path_factory.mktemp("source")
    check_ok(train(*RUN_FLAGS, "-n", str(SOURCE_STEPS), "-f", str(folder)))
    return folder / "d2r" / f"{NAME}_1"


@pytest.fixture(scope="module")
def seed_file(source_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seeds") / "seed.safetensors"
    check_ok(train("--write-seed", str(source_run), "--allow-pickle", "-o", str(path)))
    return path


def final_model(run: Path) -> D2RSAC:
    return D2RSAC.load(run / f"{NAME}.zip", device="cpu", buffer_size=1)


def assert_same_tensors(actual: dict[str, th.Tensor], expected: dict[str, th.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert th.equal(actual[name].cpu(), tensor.cpu()), name


def capture_setup(monkeypatch: pytest.MonkeyPatch, then_train: bool) -> dict[str, Any]:
    """Record the model as ``train.py`` built it, before any training (then train it, or stop there)."""
    captured: dict[str, Any] = {}
    real_train = train_cli.train

    def spy(setup: RunSetup) -> int:
        model = setup.model
        captured.update(
            run_dir=setup.run_dir,
            state={k: v.detach().clone() for k, v in model.policy.state_dict().items()},
            log_ent_coef=model.log_ent_coef.detach().clone(),
            optimizer_states=[
                len(opt.state)
                for opt in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer)
            ],
            num_timesteps=model.num_timesteps,
            n_updates=model._n_updates,
            learning_starts=model.learning_starts,
            buffer_rows=model.replay_buffer.pos + model.replay_buffer.full,
        )
        return real_train(setup) if then_train else 0

    monkeypatch.setattr(train_cli, "train", spy)
    return captured


# --------------------------------------------------------------------------------------------------
# --write-seed
# --------------------------------------------------------------------------------------------------
def test_write_seed_holds_the_learned_state_and_its_size(source_run: Path, seed_file: Path, tmp_path: Path):
    seed = read_seed(seed_file)
    size = seed_file.stat().st_size
    assert seed.algo == "d2r" and seed.policy_class == "D2RPolicy" and seed.config["algo_class"] == "D2RSAC"
    assert (seed.num_timesteps, seed.n_updates) == (SOURCE_STEPS, SOURCE_UPDATES)
    assert seed.task_names == ["reach-v3", "drawer-close-v3"]
    assert seed.env_kwargs["benchmark"] == ["reach-v3", "drawer-close-v3"]
    assert seed.env_kwargs["max_episode_steps"] == 20
    kwargs = seed.config["policy_kwargs"]
    assert (kwargs["n_modules"], kwargs["module_dim"], kwargs["encoder_sizes"]) == (4, 16, [32, 32])
    assert "optimizer_class" not in kwargs and "optimizer_kwargs" not in kwargs
    assert seed.config["source"].endswith("checkpoints/step_000000000200/model.zip")  # the newest checkpoint

    # Exactly the final model's actor, critics, critic targets (routing temperatures included) and log alpha.
    model = final_model(source_run)
    assert_same_tensors(seed.tensors, model.policy.state_dict())
    assert any(name.endswith("route_temperature") for name in seed.tensors)
    assert seed.log_ent_coef is not None and th.equal(seed.log_ent_coef, model.log_ent_coef.detach())
    with safe_open(str(seed_file), framework="pt") as handle:  # nothing else: no optimiser, no buffer
        names = set(handle.keys())
    assert names == set(model.policy.state_dict()) | {"log_ent_coef"}
    assert {name.split(".")[0] for name in names} == {"actor", "critic", "critic_target", "log_ent_coef"}
    assert seed.nbytes < size < seed.nbytes + 32_000  # the tensors plus a JSON header

    # The run, its checkpoint folder and its final zip give the same seed; the size is printed.
    checkpoint = source_run / "checkpoints" / "step_000000000200"
    for source in (checkpoint, source_run / f"{NAME}.zip"):
        out = tmp_path / f"{source.name}.safetensors"
        printed = check_ok(train("--write-seed", str(source), "--allow-pickle", "-o", str(out)))
        assert f"({out.stat().st_size / 1e6:.1f} MB, {out.stat().st_size:,} bytes)" in printed
        assert "200 env steps and 70 updates" in printed and "routing temperatures" in printed
        again = read_seed(out)
        assert_same_tensors(again.tensors, seed.tensors)
        assert th.equal(again.log_ent_coef, seed.log_ent_coef)

    # Without the targets: smaller; the targets then start from the critics.
    small = tmp_path / "small.safetensors"
    check_ok(train("--write-seed", str(seed_file), "--seed-without-targets", "-o", str(small)))
    light = read_seed(small)
    assert not light.has_critic_target and small.stat().st_size < 0.7 * size
    state = light.policy_state_dict()
    assert all(
        th.equal(state[f"critic_target.{k[7:]}"], v) for k, v in light.tensors.items() if k[:7] == "critic."
    )

    # A pickle needs --allow-pickle; -o is required; a seed is not overwritten by a folder.
    error = check_clean_error(train("--write-seed", str(source_run), "-o", str(tmp_path / "x.safetensors")))
    assert "is an SB3 .zip, a pickle" in error and "--allow-pickle" in error
    assert "needs -o FILE" in check_clean_error(train("--write-seed", str(seed_file)))
    assert not (tmp_path / "x.safetensors").exists()


def rounded_to_float16(tensors: dict[str, th.Tensor]) -> dict[str, th.Tensor]:
    """What a float16 seed keeps of float32 tensors: matrices rounded to float16 (back in float32), the rest."""
    return {k: v.half().float() if v.dim() >= 2 else v for k, v in tensors.items()}


def test_float16_seed_halves_the_matrices_and_warm_starts_them_as_rounded(
    seed_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    check_ok(train("--write-seed", str(seed_file), "--seed-without-targets", "-o", str(full)))
    printed = check_ok(
        train(
            "--write-seed",
            str(seed_file),
            "--seed-without-targets",
            "--seed-precision",
            "float16",
            "-o",
            str(half),
        )
    )
    assert "weight matrices in float16" in printed
    exact, compact = read_seed(full), read_seed(half)
    assert (exact.matrix_precision, compact.matrix_precision) == ("float32", "float16")

    # Matrices in float16, everything else (biases, routing temperatures, log alpha) untouched.
    matrix_bytes = 0
    for name, tensor in exact.tensors.items():
        stored = compact.tensors[name]
        if tensor.dim() >= 2:
            assert stored.dtype == th.float16, name
            matrix_bytes += tensor.numel() * 2
        else:
            assert stored.dtype == tensor.dtype and th.equal(stored, tensor), name
    assert any(name.endswith("route_temperature") for name in compact.tensors)
    assert th.equal(compact.log_ent_coef, exact.log_ent_coef)
    assert compact.nbytes == exact.nbytes - matrix_bytes
    assert half.stat().st_size - compact.nbytes == pytest.approx(full.stat().st_size - exact.nbytes, abs=200)

    # A warm start loads the rounded matrices into the float32 model: each weight within float16's 2**-11.
    captured = capture_setup(monkeypatch, then_train=False)
    check_ok(train(*RUN_FLAGS, "-n", "400", "-f", str(tmp_path / "logs"), "--warm-start", str(half)))
    expected = rounded_to_float16(exact.policy_state_dict())
    assert_same_tensors(captured["state"], expected)
    assert all(v.dtype == th.float32 for v in captured["state"].values() if v.is_floating_point())
    weights = exact.tensors["actor.net.w_in"]
    loaded = captured["state"]["actor.net.w_in"]
    assert not th.equal(loaded, weights)  # it did round...
    normal = weights.abs() > 1e-4  # (float16 subnormals below 6e-5 keep an absolute error under 3e-8)
    assert ((loaded - weights).abs()[normal] <= weights.abs()[normal] * 2**-11).all()  # ...within half an ulp
    assert th.equal(captured["log_ent_coef"], exact.log_ent_coef)

    # Without --write-seed, --seed-precision is refused.
    error = check_clean_error(train(*RUN_FLAGS, "-n", "400", "--seed-precision", "float16"))
    assert "--seed-precision goes with --write-seed" in error


def test_float16_seed_refuses_matrices_beyond_its_range(seed_file: Path):
    seed = read_seed(seed_file)
    seed.tensors["actor.net.w_in"].view(-1)[0] = 1e5
    with pytest.raises(
        ValueError, match=r"holds 1e\+05, beyond float16's range.*\(--seed-precision float32\)"
    ):
        seed.with_matrices_in_float16()


@pytest.mark.slow
def test_seed_of_the_default_mt10_d2r_network_is_about_14_mb(tmp_path: Path):
    env = make_mt_env("MT10")
    try:
        model = D2RSAC("D2RPolicy", env, buffer_size=1_000, device="cpu")
        seed = seed_from_model(model)
        full = write_seed(seed, tmp_path / "mt10.safetensors").stat().st_size
        light = write_seed(seed.without_critic_target(), tmp_path / "light.safetensors").stat().st_size
        compact = seed.without_critic_target().with_matrices_in_float16()
        half = write_seed(compact, tmp_path / "half.safetensors").stat().st_size
        # The policy acts nearly the same with the float16-rounded matrices (deterministic actions in [-1, 1]).
        obs = env.reset()
        actions, _ = model.predict(obs, deterministic=True)
        model.policy.load_state_dict(rounded_to_float16(seed.policy_state_dict()))
        rounded_actions, _ = model.predict(obs, deterministic=True)
    finally:
        env.close()
    # actor 2.7 MB + twin critics 5.5 MB + their targets 5.5 MB; 8.2 MB without the targets, 4.1 MB in float16.
    assert 13.5e6 < full < 14.0e6 and 8.0e6 < light < 8.5e6 and 4.0e6 < half < 4.3e6
    assert 0 < abs(actions - rounded_actions).max() < 1e-2
    assert read_seed(tmp_path / "mt10.safetensors").log_ent_coef.shape == (10,)


# --------------------------------------------------------------------------------------------------
# --warm-start
# --------------------------------------------------------------------------------------------------
def test_warm_start_loads_the_seed_exactly_and_trains_to_the_target(
    seed_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    captured = capture_setup(monkeypatch, then_train=True)
    target = 300
    check_ok(train(*RUN_FLAGS, "-n", str(target), "-f", str(tmp_path), "--warm-start", str(seed_file)))
    seed = read_seed(seed_file)

    # Right after construction: the seed's weights and log alpha exactly, fresh optimisers, the seed's counters,
    # an empty buffer and a warm-up of learning_starts steps past the seed's steps.
    assert_same_tensors(captured["state"], seed.policy_state_dict())
    assert th.equal(captured["log_ent_coef"], seed.log_ent_coef)
    assert captured["optimizer_states"] == [0, 0, 0]
    assert (captured["num_timesteps"], captured["n_updates"]) == (SOURCE_STEPS, SOURCE_UPDATES)
    assert captured["learning_starts"] == SOURCE_STEPS + LEARNING_STARTS and captured["buffer_rows"] == 0

    # It trains to the target total and saves; the curve continues from the seed's steps.
    run = captured["run_dir"]
    assert run == tmp_path / "d2r" / f"{NAME}_1"
    with zipfile.ZipFile(run / f"{NAME}.zip") as archive:
        data = json.loads(archive.read("data"))
    assert data["num_timesteps"] == target
    assert data["_n_updates"] == SOURCE_UPDATES + (target - SOURCE_STEPS - LEARNING_STARTS) // 2
    steps = [int(row["time/total_timesteps"]) for row in csv.DictReader((run / "progress.csv").open())]
    assert steps and SOURCE_STEPS < min(steps) <= max(steps) <= target  # (rows at the end of episode rounds)
    trained = final_model(run)
    assert not th.equal(trained.policy.state_dict()["actor.net.w_in"], seed.tensors["actor.net.w_in"])

    # The run records where it came from.
    records = run / NAME
    warm = yaml.safe_load((records / "warm_start.yml").read_text())
    assert warm["source"] == str(seed_file.resolve()) and warm["origin"] == f"seed file {seed_file}"
    assert (warm["num_timesteps"], warm["n_updates"], warm["warmup_until"]) == (200, 70, 260)
    assert warm["critic_target"] == "loaded" and len(warm["file_sha256"]) == 64
    assert f"--warm-start {seed_file}" in (records / "command.txt").read_text()
    assert yaml.safe_load((records / "args.yml").read_text())["warm_start"] == str(seed_file)
    assert yaml.safe_load((records / "config.yml").read_text())["learning_starts"] == LEARNING_STARTS

    # Its model card does not offer its commands as a from-scratch reproduction: it names the seed they continue.
    from d2r_sb3.publishing import stage_repo

    card = (
        stage_repo(run, tmp_path / "stage", video=None, n_eval_episodes=1).folder / "README.md"
    ).read_text()
    assert "Reproduce with the zoo" not in card
    assert (
        f"The commands of this run, as its records hold them: it was restarted from a resume seed at 200 env steps "
        f"(`seed file {seed_file}`, SHA-256 `{warm['file_sha256'][:16]}…`), so they continue an earlier run"
        in card
    )
    assert f"--warm-start {seed_file}" in card


def test_warm_start_from_a_checkpoint_a_zip_and_a_seed_without_targets(
    source_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    captured = capture_setup(monkeypatch, then_train=False)
    model = final_model(source_run)
    expected = model.policy.state_dict()
    checkpoint = source_run / "checkpoints" / "step_000000000200"
    for source in (checkpoint, source_run / f"{NAME}.zip", source_run):
        out = check_ok(
            train(*RUN_FLAGS, "-n", "400", "-f", str(tmp_path), "--warm-start", str(source), "--allow-pickle")
        )
        assert_same_tensors(captured["state"], expected)
        assert th.equal(captured["log_ent_coef"], model.log_ent_coef.detach())
        assert captured["optimizer_states"] == [0, 0, 0] and captured["num_timesteps"] == SOURCE_STEPS
        assert out == ""  # --verbose 0

    light = tmp_path / "light.safetensors"
    check_ok(
        train("--write-seed", str(checkpoint), "--allow-pickle", "--seed-without-targets", "-o", str(light))
    )
    check_ok(train(*RUN_FLAGS, "-n", "400", "-f", str(tmp_path), "--warm-start", str(light)))
    for name in expected:  # the targets start from the critics
        source = name.replace("critic_target.", "critic.")
        assert th.equal(captured["state"][name], expected[source]), name
    record = yaml.safe_load((captured["run_dir"] / NAME / "warm_start.yml").read_text())
    assert record["critic_target"] == "copied from the critics"


def test_the_learning_curve_travels_with_the_seed_and_continues_in_the_new_run(tmp_path: Path):
    at = RUN_FLAGS.index("--eval-freq")  # every 40 env steps per task instead of never, 1 episode
    evaluated = [*RUN_FLAGS[:at], "--eval-freq", "40", "--eval-episodes", "1", *RUN_FLAGS[at + 2 :]]
    check_ok(train(*evaluated, "-n", str(SOURCE_STEPS), "-f", str(tmp_path / "source"), "--save-freq", "50"))
    source = tmp_path / "source" / "d2r" / f"{NAME}_1"
    history = json.loads((source / "evaluations.json").read_text())
    assert history["timesteps"] == [80, 160]  # every 40 env steps per task, 2 tasks

    seed_path = tmp_path / "seed.safetensors"
    printed = check_ok(train("--write-seed", str(source), "--allow-pickle", "-o", str(seed_path)))
    assert "evaluation history (2 evaluations, up to 160 env steps)" in printed
    seed = read_seed(seed_path)
    assert seed.evaluations == history

    # A history rebuilt from notes after a lost folder may lack the first point's returns (None): it still loads.
    # Its best (success 1.0 here) has no model in the new run, so the new run's first evaluation writes one.
    history["mean_return"][0] = None
    history["return"] = {task: [None, values[1]] for task, values in history["return"].items()}
    history["mean_success"] = [1.0, 1.0]
    seed.config["evaluations"] = history
    write_seed(seed, seed_path)

    # On a new machine (another folder), the warm-started run's curve starts with the seed's evaluations.
    check_ok(train(*evaluated, "-n", "300", "-f", str(tmp_path / "new"), "--warm-start", str(seed_path)))
    run = tmp_path / "new" / "d2r" / f"{NAME}_1"
    continued = json.loads((run / "evaluations.json").read_text())
    assert continued["timesteps"] == [80, 160, 240]
    for key in ("mean_success", "mean_return", "wall_time"):
        assert continued[key][:2] == history[key]
    for key in ("success", "return"):
        assert {task: values[:2] for task, values in continued[key].items()} == history[key]
    assert yaml.safe_load((run / NAME / "warm_start.yml").read_text())["evaluations"] == 2
    assert (run / "best_model.zip").is_file() and continued["mean_success"][2] < 1.0

    # A checkpoint written before an evaluation gives a seed without the later ones.
    early = tmp_path / "early.safetensors"
    check_ok(
        train(
            "--write-seed",
            str(source / "checkpoints" / "step_000000000100"),
            "--allow-pickle",
            "-o",
            str(early),
        )
    )
    assert read_seed(early).evaluations["timesteps"] == [80]

    # A checkpoint folder copied out of its run (a kept milestone) gives the same history: its state.json holds
    # the history the run had when the checkpoint was written.
    copied = shutil.copytree(source / "checkpoints" / "step_000000000100", tmp_path / "milestone")
    for given in (copied, copied / "model.zip"):
        from_copy = tmp_path / "from_copy.safetensors"
        check_ok(train("--write-seed", str(given), "--allow-pickle", "-o", str(from_copy)))
        assert read_seed(from_copy).evaluations == read_seed(early).evaluations


def test_warm_start_refuses_clearly(seed_file: Path, source_run: Path, tmp_path: Path):
    logs = tmp_path / "logs"
    target = ["-n", "400", "-f", str(logs)]

    def refused(*flags: str) -> str:
        return check_clean_error(train(*flags, *target))

    # No such file.
    error = refused(*RUN_FLAGS, "--warm-start", str(tmp_path / "missing.safetensors"))
    assert "missing.safetensors: no such file or folder" in error and "--write-seed RUN -o FILE" in error
    # Another algorithm (and so another policy class).
    error = refused(*run_flags(algo="mtsac"), "--warm-start", str(seed_file))
    assert "the seed is of algo 'd2r', this run is 'mtsac'" in error and "(differing key: algo)" in error
    # Another network: the first differing tensor and the policy_kwargs behind it are named.
    error = refused(*run_flags("policy_kwargs:{n_modules: 6}"), "--warm-start", str(seed_file))
    assert "'actor.net.w_in' has shape" in error and "(differing key: actor.net.w_in)" in error
    assert "n_modules 4 in the seed, 6 here" in error
    # A fixed entropy coefficient has no log alpha to load into.
    error = refused(*run_flags("ent_coef:0.1"), "--warm-start", str(seed_file))
    assert "(differing key: log_ent_coef)" in error and "ent_coef:auto" in error
    # Combined with --resume.
    error = refused(*RUN_FLAGS, "--resume", str(source_run), "--warm-start", str(seed_file))
    assert "--warm-start starts a new run" in error and "Pass one of them" in error
    # A target at or below the seed's steps; a pickle without --allow-pickle; a file that is not a seed.
    error = check_clean_error(train(*RUN_FLAGS, "-n", "200", "-f", str(logs), "--warm-start", str(seed_file)))
    assert "-n is the target total" in error
    error = refused(*RUN_FLAGS, "--warm-start", str(source_run / "checkpoints" / "step_000000000200"))
    assert "is an SB3 .zip, a pickle" in error and "--write-seed" in error
    error = refused(*RUN_FLAGS, "--warm-start", str(source_run / "policy" / "policy.safetensors"))
    assert "not a resume seed" in error
    assert "holds the actor only" in refused(*RUN_FLAGS, "--warm-start", str(source_run / "policy"))
    assert not logs.exists() or not any(logs.rglob("*.yml"))  # no run folder left behind
