"""Restarts that recover, in this process (one rank): monolithic `.pt` checkpoints (what DDP writes, from rank 0;
FSDP2 with `state_dict_type: full`) and sharded FSDP2 folders.

A reference run saves after every step; each scenario copies its checkpoint folder, leaves it as a kill, a full
disk or a cut copy would, and runs the same config again: it resumes from the newest complete checkpoint, says
which files it skipped, and repeats the reference's losses and weights exactly. Also: rotation over checkpoints
from before the restart, the file log across restarts (and its plot), `load_path` checked before the model is
built, and the saver's write-then-rename. Real kills of a 2-rank FSDP2 job: test_checkpoint_recovery_dist.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from step_utils import LossRecorder
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.training import checkpoints
from flamingo_composer.training.config import load_config
from flamingo_composer.training.run import main, train_from_config
from flamingo_composer.training.run_logs import read_file_log, read_run_metrics

STEPS = 6
LOSSES = ("loss/train/total", "loss/train/laion", "loss/train/mmc4")
STRATEGIES = {  # the checkpoint formats: rank 0's .pt without FSDP (DDP's), FSDP2 full (.pt), FSDP2 sharded
    "ddp_format": [],
    "fsdp2_full": ["fsdp_config={version: 2, state_dict_type: full}"],
    "fsdp2_sharded": ["fsdp_config={version: 2, state_dict_type: sharded}"],
}


def overrides(data_root: Path, out: Path, steps: int = STEPS, keep: int = -1, file_log: bool = False) -> list[str]:
    """short_run_overrides saving after every step; the file log (OUT/logs-rank0.txt) only when asked for."""
    return [*short_run_overrides(data_root, out, max_duration=steps), "save_interval=1",
            f"save_num_checkpoints_to_keep={keep}", *([] if file_log else ["loggers={}"])]  # fmt: skip


def train(args: list[str]) -> dict[int, dict[str, float]]:
    """Run `args` in this process; the logged losses by step (1-based, as Composer's batch count after it)."""
    return train_with_weights(args)[0]


def train_with_weights(args: list[str]) -> tuple[dict[int, dict[str, float]], dict[str, torch.Tensor]]:
    """(losses by step, the trainable weights at the end)."""
    recorder = LossRecorder()
    trainer = train_from_config(load_config(RUN_YAML, args), extra_callbacks=[recorder])
    weights = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for name, p in trainer.state.model.named_parameters() if p.requires_grad}  # fmt: skip
    trainer.close()
    return dict(recorder.losses), weights


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


@pytest.fixture(scope="module")
def references(data_root, tmp_path_factory):
    """strategy -> the uninterrupted run (made once): its losses, its weights and its checkpoint folder
    (ep0-ba1 ... ep0-ba6, latest -> ba6)."""
    made = {}

    def reference(strategy: str) -> tuple[dict[int, dict[str, float]], dict[str, torch.Tensor], Path]:
        if strategy not in made:
            out = tmp_path_factory.mktemp(f"reference-{strategy}")
            losses, weights = train_with_weights([*overrides(data_root, out), *STRATEGIES[strategy]])
            assert sorted(losses) == list(range(1, STEPS + 1))
            made[strategy] = losses, weights, out / "checkpoints"
        return made[strategy]

    return reference


@pytest.fixture(scope="module")
def reference(references) -> tuple[dict[int, dict[str, float]], Path]:
    """The uninterrupted run without FSDP: its losses and its checkpoint folder."""
    losses, _, folder = references("ddp_format")
    return losses, folder


def name(batch: int) -> str:
    return f"ep0-ba{batch}-rank0.pt"


def truncate(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def point_latest(folder: Path, target: str) -> None:
    latest = folder / "latest-rank0.pt"
    latest.unlink()
    os.symlink(target, latest)


def killed_while_saving_5(folder: Path) -> None:
    """What today's in-place save leaves (a partial ep0-ba5 under its final name, latest still at ba4), and what
    a save by rename leaves (the .partial file of the save after it)."""
    (folder / name(6)).rename(folder / "ep0-ba6-rank0.partial.pt")
    truncate(folder / "ep0-ba6-rank0.partial.pt", 0.3)
    truncate(folder / name(5))
    point_latest(folder, name(4))


def latest_truncated(folder: Path) -> None:
    truncate(folder / name(6))


def latest_target_deleted(folder: Path) -> None:
    (folder / name(6)).unlink()


SCENARIOS = {  # damage, the batch the run resumes from, {file: what its warning line says}
    "killed_while_saving": (killed_while_saving_5, 4, {name(5): "skipped: truncated or not a torch checkpoint",
                                                       "ep0-ba6-rank0.partial.pt": "removed, an unfinished"}),
    "latest_truncated": (latest_truncated, 5, {name(6): "skipped: truncated or not a torch checkpoint"}),
    "latest_target_deleted": (latest_target_deleted, 5, {"latest-rank0.pt": f"now points at {name(5)}"}),
}  # fmt: skip


def restart(references, strategy: str, damage, data_root: Path, tmp_path: Path, caplog) -> tuple[Path, list[str]]:
    """Copy the reference's checkpoints, `damage` them, run the same config (keeping 2 checkpoints), check that it
    repeats the reference from where it resumed; (the checkpoint folder, the warning lines)."""
    reference_losses, reference_weights, reference_folder = references(strategy)
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference_folder, folder, symlinks=True)
    resumed_from = damage(folder)

    with caplog.at_level(logging.WARNING, logger="flamingo_composer"):
        losses, weights = train_with_weights([*overrides(data_root, tmp_path, keep=2), *STRATEGIES[strategy]])

    assert sorted(losses) == list(range(resumed_from + 1, STEPS + 1))  # not from batch 0, not from a damaged one
    for step, logged in losses.items():
        assert {k: logged[k] for k in LOSSES} == {k: reference_losses[step][k] for k in LOSSES}, step
    for parameter, value in reference_weights.items():
        assert torch.equal(weights[parameter], value), parameter
    return folder, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("strategy", "scenario"),
    [("ddp_format", "killed_while_saving"), ("ddp_format", "latest_truncated"),
     ("ddp_format", "latest_target_deleted"), ("fsdp2_full", "killed_while_saving")],
)  # fmt: skip
def test_restart_resumes_from_the_newest_complete_checkpoint(
    references, data_root, tmp_path, caplog, strategy, scenario
):
    damage, resumed_from, named = SCENARIOS[scenario]

    def damaged(folder: Path) -> int:
        damage(folder)
        return resumed_from

    folder, warnings = restart(references, strategy, damaged, data_root, tmp_path, caplog)

    for file, says in named.items():
        assert len([line for line in warnings if file in line and says in line]) == 1, (file, warnings)
    # Rotation counts the checkpoints written before the restart: the newest 2 of the run remain.
    assert sorted(p.name for p in folder.glob("ep*-ba*-rank0.pt")) == [name(5), name(6)]
    assert not list(folder.glob("*.partial.*"))
    assert os.readlink(folder / "latest-rank0.pt") == name(6)


def test_sharded_restart_skips_damaged_folders_and_a_missing_latest(references, data_root, tmp_path, caplog):
    def damage(folder: Path) -> int:
        assert os.readlink(folder / "latest-sharded-rank0") == "ep0-ba6"
        shutil.rmtree(folder / "ep0-ba6")  # latest's target
        truncate(folder / "ep0-ba5" / "__0_0.distcp", 0.5)
        truncate(folder / "ep0-ba4" / ".metadata", 0.5)
        shutil.copytree(folder / "ep0-ba3", folder / "ep0-ba7")  # an unfinished save: no .metadata
        (folder / "ep0-ba7" / ".metadata").unlink()
        return 3

    folder, warnings = restart(references, "fsdp2_sharded", damage, data_root, tmp_path, caplog)

    for says in (f"checkpoint {folder}/ep0-ba5 skipped: __0_0.distcp is truncated",
                 f"checkpoint {folder}/ep0-ba4 skipped: .metadata unreadable or truncated",
                 f"{folder}/ep0-ba7: removed, an unfinished checkpoint save",
                 f"{folder}/latest-sharded-rank0 now points at ep0-ba3 (was: ep0-ba6, missing)"):  # fmt: skip
        assert len([line for line in warnings if line.startswith(says)]) == 1, (says, warnings)
    assert sorted(p.name for p in folder.glob("ep*")) == ["ep0-ba4.damaged", "ep0-ba5", "ep0-ba5.damaged", "ep0-ba6"]
    assert os.readlink(folder / "latest-sharded-rank0") == "ep0-ba6"


def test_a_folder_copied_through_its_links_gets_its_latest_link_back(reference, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference[1], folder, symlinks=False)  # `cp -rL`: latest-rank0.pt is a copy of ba6
    assert not (folder / "latest-rank0.pt").is_symlink()
    chosen = checkpoints.newest_complete_checkpoint(folder, sharded=False, latest_link="latest-rank0.pt")
    assert chosen == folder / name(6) and os.readlink(folder / "latest-rank0.pt") == name(6)
    assert (folder / "latest-rank0.pt.not-a-link").is_file()


def test_no_complete_checkpoint_stops_before_the_model_listing_what_it_found(
    reference, data_root, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for batch in (2, 4):
        shutil.copy(reference[1] / name(batch), folder / name(batch))
        truncate(folder / name(batch))
    os.symlink(name(4), folder / "latest-rank0.pt")
    monkeypatch.setattr("flamingo_composer.training.run.build_flamingo", _must_not_build)

    assert main([str(RUN_YAML), *overrides(data_root, tmp_path)]) == 2

    error = capsys.readouterr().err
    assert f"config error: autoresume: no complete checkpoint in {folder}" in error
    assert f"{name(4)}: truncated or not a torch checkpoint" in error
    assert f"{name(2)}: truncated or not a torch checkpoint" in error
    assert sorted(p.name for p in folder.iterdir()) == sorted([name(2), name(4), "latest-rank0.pt"])  # untouched


def _must_not_build(*args, **kwargs):
    raise AssertionError("the model was built before the checkpoint was checked")


@pytest.mark.parametrize("kind", ["missing", "random_bytes", "truncated", "a_zip_not_torch", "not_this_trainer"])
def test_a_bad_load_path_is_a_config_error_before_the_model_is_built(
    reference, data_root, tmp_path, monkeypatch, capsys, kind
):
    path = tmp_path / "given.pt"
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        shutil.copy(reference[1] / name(2), path)
        truncate(path)
    elif kind == "a_zip_not_torch":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    elif kind == "not_this_trainer":
        torch.save({"state": {"model": {"encoder.weight": torch.zeros(2)}, "timestamp": {}}}, path)
    monkeypatch.setattr("flamingo_composer.training.run.build_flamingo", _must_not_build)

    # run.yaml's autoresume is on: load_path is what an empty save_folder starts from.
    assert main([str(RUN_YAML), *overrides(data_root, tmp_path), f"load_path={path}"]) == 2

    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("config error: load_path: ") and str(path) in error[0], error
    expected = {"missing": "file not found", "random_bytes": "not a torch checkpoint", "truncated": "truncated",
                "a_zip_not_torch": "unreadable (RuntimeError", "not_this_trainer": "not a checkpoint of this trainer",
                }[kind]  # fmt: skip
    assert expected in error[0]


def test_a_released_checkpoint_as_load_path_points_at_load_reference_checkpoint(
    data_root, tmp_path, capsys, reference_dir
):
    released = reference_dir / "checkpoint.pt"  # the reference's layout, as OpenFlamingo publishes it
    assert main([str(RUN_YAML), *overrides(data_root, tmp_path), f"load_path={released}"]) == 2
    assert "give it as load_reference_checkpoint" in capsys.readouterr().err


def test_without_autoresume_the_folder_conflict_names_this_trainers_keys(reference, data_root, tmp_path):
    shutil.copytree(reference[1], tmp_path / "checkpoints", symlinks=True)
    with pytest.raises(FileExistsError, match="set save_overwrite: true \\(or autoresume: true to continue"):
        train([*overrides(data_root, tmp_path), "autoresume=false"])


def test_a_good_load_path_starts_the_run_from_it(reference, data_root, tmp_path):
    losses = train([*overrides(data_root, tmp_path), f"load_path={reference[1] / name(5)}"])
    assert sorted(losses) == [6] and losses[6]["loss/train/total"] == reference[0][6]["loss/train/total"]


def test_the_file_log_and_its_plot_hold_the_whole_run_across_a_restart(data_root, tmp_path):
    from flamingo_composer.cli import plot as plot_run
    for steps in (3, 5):  # the second command continues the first run (autoresume)
        train(overrides(data_root, tmp_path, steps=steps, file_log=True))

    metrics = read_file_log(tmp_path / "logs-rank0.txt")
    assert [step for step, _ in metrics["loss/train/total"]] == [0, 1, 2, 3, 4]
    assert [step for step, _ in metrics["lr-AdamW/group0"]] == [1, 2, 3, 4, 5]  # logged at each batch's end
    figure, drawn = plot_run.plot_metrics(read_run_metrics(tmp_path)[0])
    lines = [line for ax in figure.axes for line in ax.get_lines() if line.get_label() == "total"]
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [0, 1, 2, 3, 4]


def test_the_file_log_reader_lets_a_restart_supersede_what_the_killed_process_logged_after_its_checkpoint(
    tmp_path,
):
    """The killed process logged batches 0-4 (losses at step k, the lr at k + 1) and was checkpointed at 3."""
    first = [f"[metric][batch={k}]: loss/train/total: {10 + k} \n[metric][batch={k + 1}]: lr: 0.{k} \n"
             for k in range(5)]  # fmt: skip
    second = [f"[metric][batch={k}]: loss/train/total: {20 + k} \n[metric][batch={k + 1}]: lr: 0.{k}5 \n"
              for k in (3, 4, 5)]  # fmt: skip
    log = tmp_path / "logs-rank0.txt"
    log.write_text("[segment][batch=0]: ...\n" + "".join(first) + "[metric][batch=5]: loss/tr"  # cut mid-line
                   + "\n[segment][batch=3]: ...\n" + "".join(second))  # fmt: skip

    metrics = read_file_log(log)

    assert metrics["loss/train/total"] == [(0, 10), (1, 11), (2, 12), (3, 23), (4, 24), (5, 25)]
    assert metrics["lr"] == [(1, 0.0), (2, 0.1), (3, 0.2), (4, 0.35), (5, 0.45), (6, 0.55)]


def test_rotation_keeps_the_newest_of_the_run_including_earlier_processes_and_never_a_later_run(tmp_path):
    for batch in (2, 4, 6, 8):
        (tmp_path / name(batch)).write_bytes(b"x")
    (tmp_path / "ep0-ba3-rank0.pt.damaged").write_bytes(b"x")
    victims = checkpoints.rotation_victims(tmp_path / name(6), sharded=False, keep=2)
    assert victims == [tmp_path / name(2)]  # ba8 lies after the checkpoint just saved: not this run's past
    assert checkpoints.rotation_victims(tmp_path / name(6), sharded=False, keep=-1) == []


def test_a_save_appears_under_its_name_only_when_complete(tmp_path, monkeypatch):
    from composer.utils import checkpoint as composer_checkpoint

    final = tmp_path / name(3)
    seen = {}

    def write(state_dict, filename):
        seen["final_exists_during_write"] = final.exists()
        Path(filename).write_bytes(b"complete")
        if state_dict.get("fail"):
            raise OSError("No space left on device")

    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", write)
    with checkpoints._monolithic_writes_by_rename():
        composer_checkpoint._write_checkpoint_file({}, str(final))
    assert seen == {"final_exists_during_write": False} and final.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name(3)]

    with checkpoints._monolithic_writes_by_rename(), pytest.raises(OSError, match="No space"):
        composer_checkpoint._write_checkpoint_file({"fail": True}, str(tmp_path / name(4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name(3)]  # neither a partial nor a final ba4
    assert composer_checkpoint._write_checkpoint_file is write  # restored
