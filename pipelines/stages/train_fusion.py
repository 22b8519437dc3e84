"""Stage ``train_fusion/<method>``: train a learned fusion method on the training split into
``<run>/train_fusion/<method>/`` (``last.pt`` after every epoch, ``final.pt``, ``log.csv``), or
take its given checkpoint. Classical methods and folders of fused images pass through with a
fingerprint only. The training itself is a :class:`TrainFusionJob` handed to the executor."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fuseseg.errors import CheckpointError, ConfigError, FusesegError
from fusion.pretrained import resolve_checkpoint
from pipelines.config import dump_config, from_dict, to_dict
from pipelines.executor import Executor
from pipelines.experiment import ExperimentConfig, FusionMethodConfig
from pipelines.runstate import (
    accept_earlier_form,
    fingerprint,
    folder_manifest,
    named_fingerprint,
    run_relative,
    source_digest,
    stage_record,
)
from pipelines.stage_job import StageJob
from pipelines.stages.base import Plan, Stage, precision_of, prepare_dir


def _method_train_cfg(cfg: ExperimentConfig, m: FusionMethodConfig, data_root: Path, device: str):
    base = to_dict(cfg.fusion_train)
    base.update(m.train)
    base.update({"method": m.method, "method_kwargs": dict(m.kwargs), "device": device,
                 "plugins": list(cfg.plugins)})
    base["data_root"] = str(data_root)
    from fusion.train_config import FusionTrainConfig

    return from_dict(FusionTrainConfig, base, f"fusion[{m.name}].train")


# keys added to fuseseg after run folders existed, with their defaults
LATER_KEYS = {"phase_epochs": {}, "init_checkpoint": None, "semantic_rounds": 0, "semantic_gamma": 1.0,
              "semantic_segment": {}}


def train_inputs(tcfg) -> dict:
    """The training config as a fingerprint input: keys added to fuseseg later are left out while
    at their default (:data:`LATER_KEYS`), so earlier run folders stay current."""
    out = to_dict(tcfg)
    for key, default in LATER_KEYS.items():
        if key in out and out[key] == default:
            out.pop(key)
    return out


@dataclasses.dataclass
class TrainFusionJob(StageJob):
    """The body of stage train_fusion/<method>: train into ``out`` (resuming from its last.pt)."""

    tcfg: object            # fusion.train_config.FusionTrainConfig
    out: Path
    nproc: int = 1          # >1: under torchrun (DDP)
    tensorboard: bool = False   # also log to out/tensorboard/
    segment: dict | None = None   # the experiment's segment settings (base of SeAFusion's rounds' segmenter)

    def run(self) -> dict:
        from fusion.train import train_fusion

        out = Path(self.out)
        resume = (out / "last.pt").is_file()
        if self.tcfg.semantic_rounds:   # SeAFusion's joint rounds, in this process (no torchrun)
            from pipelines.semantic_rounds import train_semantic_rounds
            final = train_semantic_rounds(self.tcfg, out, resume=(out / "rounds.json").is_file(),
                                          tensorboard=self.tensorboard, segment_base=self.segment)
            return {"checkpoint": str(final)}
        if self.nproc > 1:
            dump_config(self.tcfg, out / "requested.yaml")
            self.launch(["train-fusion", str(out / "requested.yaml"), "--out", str(out)]
                      + (["--resume"] if resume else []) + (["--tensorboard"] if self.tensorboard else []))
            final = out / "final.pt"
        else:
            final = train_fusion(self.tcfg, out, resume=resume, tensorboard=self.tensorboard)
        return {"checkpoint": str(final)}


def stage_train_fusion(cfg: ExperimentConfig, run_dir: Path, plan: Plan, m: FusionMethodConfig,
                       data_root: Path, data_fp: str, ex: Executor | None = None) -> tuple[Path | None, str]:
    """Train a trainable registered method (or take its given checkpoint). Returns (checkpoint, fp)."""
    from fusion.registry import get_entry

    if m.type == "folder":
        return None, fingerprint("folder", data_fp, m.name, str(m.folder), folder_manifest(Path(m.folder)))
    entry = get_entry(m.method)
    # a plug-in's own source is part of what it computes (built-ins: the fuseseg version, in data_fp)
    source = None if entry.module.startswith("fusion.") else source_digest(entry.module)
    if m.checkpoint is not None:
        ck = resolve_checkpoint(m.checkpoint, m.method)
        if not ck.is_file():
            raise ConfigError(f"fusion[{m.name}].checkpoint: {ck} does not exist; give an existing "
                              "checkpoint, or remove the key to train the method here.")
        return ck, fingerprint("checkpoint", data_fp, source, str(ck.resolve()), ck.stat().st_mtime_ns)
    if not entry.trainable:
        return None, fingerprint("static", data_fp, source, m.method, m.kwargs)
    tcfg = _method_train_cfg(cfg, m, data_root, cfg.device)
    fp = _train_fp(run_dir, m.name, tcfg, data_fp, source, precision_of(cfg.device, tcfg.amp))
    out = run_dir / "train_fusion" / m.name
    ex = ex or Executor()
    with Stage(run_dir, f"train_fusion/{m.name}", fp, plan, "train_fusion") as st:
        if not st.skip:
            job = TrainFusionJob(tcfg, out, ex.nproc(cfg.launcher, cfg.gpus), cfg.tensorboard,
                                 _segment_base(cfg) if tcfg.semantic_rounds else None)
            prepare = lambda: prepare_dir(out, fp, run_dir, st.key, fresh=st.forced)  # noqa: E731
            st.info.update(ex.run(run_dir, st.key, fp, out, job, prepare))
    ck = out / "final.pt"
    if not ck.is_file() and plan.runs("fuse") and not plan.dry_run:
        raise FusesegError(f"fusion method {m.name!r} has no trained checkpoint ({ck}); run the "
                           "train_fusion stage (drop --only/--from) first.")
    return ck, fp


def _segment_base(cfg: ExperimentConfig) -> dict:
    """The experiment's segmenter settings as the base of SeAFusion's rounds' segmenter (its seed
    list and evaluation keys left out)."""
    from segmentation.config import SegConfig

    seg = to_dict(cfg.segmentation)
    names = {f.name for f in dataclasses.fields(SegConfig)}
    return {k: v for k, v in seg.items() if k in names and k not in ("seed", "device")}


def _train_fp(run_dir: Path, name: str, tcfg, data_fp: str, source: str | None, precision: str) -> str:
    """The fingerprint of training method ``name``: a data set inside the run folder (the generated
    one) enters it relative to the run folder, so a moved or copied run stays up to date. A record
    written before (the run folder's path written out, here or where its checkpoint says the run
    was) is accepted as it is (:func:`accept_earlier_form`)."""
    settings = train_inputs(tcfg)

    def fp_with(data_root: str) -> str:
        return named_fingerprint("train", **{"data": data_fp, "plugin source": source,
                                             "fusion_train": {**settings, "data_root": data_root},
                                             "precision": precision})

    inside = run_relative(tcfg.data_root, run_dir)
    if inside is None:
        return fp_with(str(tcfg.data_root))
    key = f"train_fusion/{name}"
    earlier = [str(run_dir / "data")]
    ck = Path(str((stage_record(run_dir, key) or {}).get("checkpoint", "")))
    if ck.parts[-3:] == ("train_fusion", name, "final.pt"):   # where the run folder was then
        earlier.append(str(ck.parents[2] / "data"))
    return accept_earlier_form(run_dir, key, fp_with(inside), [fp_with(e) for e in earlier])


def check_fusion_methods(methods: list[FusionMethodConfig], fusion_train=None) -> None:
    """Build every registered method with its ``kwargs`` (on the CPU), loading the ``checkpoint:``
    where one is given, so that unknown settings, a corrupt file, another method's file or another
    shape fail before any stage rewrites the run folder. ``fusion_train`` (the experiment's
    FusionTrainConfig): also check the training schedule (``phase_epochs`` names, with the method's
    ``train:`` overrides) of each method trained here."""
    from fusion.fuse import load_fusion_method
    from fusion.registry import create_method
    from fusion.train_config import phase_schedule

    for m in methods:
        if m.type != "registered":
            continue
        if m.checkpoint is None:
            try:
                model = create_method(m.method, **m.kwargs)
            except ConfigError as exc:
                raise ConfigError(f"fusion[{m.name}].kwargs: {exc}") from exc
            if fusion_train is not None and hasattr(model, "phases"):
                t = {**to_dict(fusion_train), **m.train}
                if t.get("semantic_rounds") and not hasattr(model, "set_semantic_loss"):
                    raise ConfigError(f"fusion[{m.name}] (train: or fusion_train:): semantic_rounds="
                                      f"{t['semantic_rounds']}, but method {m.method!r} has no semantic loss; "
                                      "the rounds are SeAFusion's (method: seafusion). Set semantic_rounds: 0 for it.")
                try:
                    phase_schedule(m.method, tuple(model.phases), t["structure_epochs"], t["epochs"],
                                   t.get("phase_epochs"))
                except ConfigError as exc:
                    raise ConfigError(f"fusion[{m.name}] (train: or fusion_train:): {exc}") from exc
            continue
        try:
            ck = resolve_checkpoint(m.checkpoint, m.method)
        except CheckpointError as exc:
            raise CheckpointError(f"fusion[{m.name}].checkpoint: {exc}") from exc
        if not ck.is_file():
            raise ConfigError(f"fusion[{m.name}].checkpoint: {ck} does not exist; give an existing "
                              "checkpoint, or remove the key to train the method here.")
        try:
            load_fusion_method(m.method, checkpoint=ck, kwargs=m.kwargs, device="cpu")
        except CheckpointError as exc:
            raise CheckpointError(f"fusion[{m.name}].checkpoint: {exc}") from exc
