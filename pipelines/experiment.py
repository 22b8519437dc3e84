"""The experiment's configuration: one typed dataclass tree, loaded from YAML.

``configs/default.yaml`` runs on a 2-core CPU in minutes on the synthetic data set;
``configs/msrs.yaml`` carries the paper's settings for a user's MSRS copy on a GPU. Every key
is documented here; an unknown key is an error naming the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fuseseg.data.pairs import Layout
from fuseseg.data.paths import check_plain_name
from fuseseg.errors import ConfigError
from fuseseg.limits import check_image_shape
from fusion.train_config import FusionTrainConfig
from pipelines.executor import ExecutorConfig
from segmentation.config import SegConfig

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"      # a checkout / editable install
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"         # a built wheel (see setup.py)


@dataclass
class SyntheticConfig:
    """Size of the synthetic MSRS-like data set generated when ``data.root`` is null."""

    train: int = 160   # training scenes
    test: int = 48   # test scenes
    size: tuple[int, int] = (192, 256)     # H, W
    seed: int = 0   # same seed: byte-identical files
    zoom: float = 1.0                      # cameras' focal-length factor: objects appear `zoom` times larger

    def __post_init__(self):
        from fuseseg.data.synthetic import valid_zoom

        if self.train < 0 or self.test < 0 or self.train + self.test == 0:
            raise ConfigError(f"data.synthetic.train={self.train}, test={self.test}: give counts >= 0 with at "
                              "least one scene in total (the default is 160 and 48).")
        if not (isinstance(self.size, (list, tuple)) and len(self.size) == 2):
            raise ConfigError(f"data.synthetic.size={self.size!r}: give [height, width], e.g. [192, 256].")
        check_image_shape(self.size, "data.synthetic.size", max_pixels=10**18)   # the pixel limit: ExperimentConfig
        if not valid_zoom(self.zoom):
            raise ConfigError(f"data.synthetic.zoom={self.zoom!r}: give a focal-length factor > 0 "
                              "(1.0 = the generator's original camera; 1.5 shows every object 1.5x larger)")


@dataclass
class DataConfig:
    """The data set: a labelled MSRS-layout folder, or the synthetic one generated in the run folder."""

    root: Path | None = None               # MSRS-layout data set; null = generate the synthetic set in the run folder
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    layout: Layout = field(default_factory=Layout)
    ir16: Literal["minmax", "scale"] = "minmax"   # 16-bit infrared -> 8-bit mapping
    num_classes: int = 9   # label classes (MSRS: 9); 255 in a label means ignore
    validate: bool = True                  # read and check every file once before training

    def __post_init__(self):
        if not 2 <= self.num_classes <= 255:
            raise ConfigError(f"data.num_classes={self.num_classes}: give 2..255 classes (label files are "
                              "8-bit and 255 means ignore); MSRS has 9.")


@dataclass
class FusionMethodConfig:
    """One fusion variant of the experiment.

    ``type: registered``: a method of the registry (built-in or from a ``plugins:`` module); a
    trainable one is trained by the pipeline unless ``checkpoint`` is given (a file, or
    ``pretrained``: the weights shipped with fuseseg, see :mod:`fusion.pretrained`). ``type: folder``:
    already fused images in ``folder`` (``folder/train/NAME.png`` and ``folder/test/NAME.png``,
    or only ``test/`` when used for metrics only), checked against the data set's names and
    sizes."""

    name: str                              # variant name, a plain name (folders fused/<name>/, segment/<name>/)
    type: Literal["registered", "folder"] = "registered"   # registered (a registry method) | folder (already fused images)
    method: str | None = None              # registry name; defaults to ``name``
    kwargs: dict[str, Any] = field(default_factory=dict)   # keyword arguments of the method
    checkpoint: Path | None = None   # trained weights (a file, or `pretrained`); null: train it here if trainable
    folder: Path | None = None   # type folder: holds train/ and test/ fused images
    train: dict[str, Any] = field(default_factory=dict)   # overrides of fusion_train for this method

    def __post_init__(self):
        if self.type == "folder" and self.folder is None:
            raise ConfigError(f"fusion method {self.name!r} has type: folder but no `folder:`; give the "
                              "folder holding train/ and test/ fused images.")
        if self.type == "registered" and self.folder is not None:
            raise ConfigError(f"fusion method {self.name!r} gives a `folder:` but its type is registered; "
                              "set `type: folder` to use already fused images.")
        if self.method is None and self.type == "registered":
            self.method = self.name


@dataclass
class MetricsStageConfig:
    """The metrics stage: fusion quality metrics of every fused variant on the test split."""

    enabled: bool = True   # score the fused test images with the fusion quality metrics
    # reference: the CDDFuse evaluator (MI in nats); sspfusion: the same with MI in bits (the paper's
    # tables); tang: Tang's MATLAB toolbox (bits, AG / (M-1)(N-1), MSE on [0,1], PSNR with peak 1)
    convention: Literal["reference", "sspfusion", "tang"] = "reference"
    workers: int | None = None                  # None: all cores
    names: list[str] | None = None              # a subset of the metrics, e.g. [EN, SD, MI]; None: all 13

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"metrics.workers={self.workers}: give at least 1 thread, or null for all cores.")
        if self.names is not None:
            from fusion.metrics import resolve_metrics

            try:
                resolve_metrics(self.names)
            except ValueError as exc:
                raise ConfigError(f"metrics.names: {exc}") from None


@dataclass
class ReportConfig:
    """The report: the mIoU table's bootstrap, the pairwise tests and the figure grid."""

    bootstrap: int = 2000                       # paired bootstrap resamples for the mIoU-gain CI
    permutations: int = 9999                    # random sign flips of the pairwise tests (all 2^n when fewer)
    figure_scenes: int = 4                      # test scenes in the figure grid

    def __post_init__(self):
        if self.bootstrap < 1:
            raise ConfigError(f"report.bootstrap={self.bootstrap}: give at least 1 resample (2000 is usual).")
        if self.permutations < 99:
            raise ConfigError(f"report.permutations={self.permutations}: give at least 99 sign flips "
                              "(9999 is usual: p-values down to 1e-4).")
        if self.figure_scenes < 0:
            raise ConfigError(f"report.figure_scenes={self.figure_scenes}: give 0 (no figure) or more scenes.")


@dataclass
class LimitsConfig:
    """Resource limits (see fuseseg/limits.py); null: the environment variable, else the default."""

    # pixels per image (header checked before decoding; also bounds data.synthetic.size and
    # fusion_train.synthetic_size); null: $FUSESEG_MAX_PIXELS, else 50,000,000
    max_pixels: int | None = None
    # decoded bytes per image (pixels x channels x bytes per sample); null: $FUSESEG_MAX_IMAGE_BYTES, else 512 MiB
    max_image_bytes: int | None = None
    # parameters of a model (fusion or segmentation) rebuilt from a checkpoint's kwargs, counted
    # on the meta device before it is allocated; null: $FUSESEG_MAX_MODEL_PARAMETERS, else 200,000,000
    max_model_parameters: int | None = None

    def __post_init__(self):
        for key in ("max_pixels", "max_image_bytes", "max_model_parameters"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"limits.{key}={value}: give a positive number, or null for the default.")


def _default_methods() -> list[FusionMethodConfig]:
    return [FusionMethodConfig(name="sspfusion"), FusionMethodConfig(name="laplacian"),
            FusionMethodConfig(name="gff")]


@dataclass
class ExperimentConfig:
    name: str = "default"                       # run folder: <results_dir>/<name>; a plain name (no '/', '..')
    results_dir: Path = Path("results")   # where run folders go
    seed: int = 0   # seeds the run process and the report's bootstrap (the trainers: fusion_train.seed, seg_seeds)
    device: str = "auto"                        # auto | cpu | cuda | cuda:1 ...
    plugins: list[str] = field(default_factory=list)   # modules that register fusion methods
    launcher: Literal["none", "torchrun"] = "none"     # torchrun: each training stage runs under DDP
    gpus: int = 1                                       # processes per training stage with torchrun
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)   # inprocess | local | slurm jobs
    data: DataConfig = field(default_factory=DataConfig)
    fusion: list[FusionMethodConfig] = field(default_factory=_default_methods)
    fusion_train: FusionTrainConfig = field(default_factory=FusionTrainConfig)
    fuse_batch_size: int = 4   # pairs fused per batch (same-size images)
    fuse_compile: bool = False   # fuse with torch.compile'd networks (faster on large one-size folders; ~15 s compiling per shape)
    metrics: MetricsStageConfig = field(default_factory=MetricsStageConfig)
    segmentation: SegConfig = field(default_factory=SegConfig)
    seg_seeds: list[int] = field(default_factory=lambda: [0])   # one segmenter per variant and seed (mean +- spread in the table)
    variants: list[str] | None = None           # None: ir, vi and every fusion method
    report: ReportConfig = field(default_factory=ReportConfig)
    # log both trainers to TensorBoard in <run folder>/.../tensorboard/ (needs the tensorboard
    # package); logging only: switching it changes no fingerprint, so finished trainings stay done
    tensorboard: bool = False
    # torch threads of this process and of each training (0 or null: chosen from the CPUs it may use
    # -- affinity mask, cgroup quota, SLURM allocation -- and fewer while other work loads the
    # machine; README, 'Threads and shared machines'); not part of any fingerprint
    threads: int | None = 0
    # resource limits (fuseseg/limits.py): an input over one is refused, naming it, before memory is spent;
    # the YAML limits are environment variables only (read before the config): FUSESEG_YAML_MAX_NODES
    # (values after expanding aliases, 1,000,000) and FUSESEG_YAML_MAX_DEPTH (nesting, 100)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self):
        check_plain_name(self.name, "name")
        max_pixels = self.limits.max_pixels
        check_image_shape(self.data.synthetic.size, "data.synthetic.size", max_pixels)
        check_image_shape(self.fusion_train.synthetic_size, "fusion_train.synthetic_size", max_pixels)
        for i, m in enumerate(self.fusion):
            check_plain_name(m.name, f"fusion[{i}].name")
        names = [m.name for m in self.fusion]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"fusion: the variant name(s) {dup} appear twice; give each method a unique name.")
        clash = {"ir", "vi"} & set(names)
        if clash:
            raise ConfigError(f"fusion: {sorted(clash)} is reserved for the single-modality variants; rename it.")
        if self.variants is not None:
            unknown = [v for v in self.variants if v not in ["ir", "vi", *names]]
            if unknown:
                raise ConfigError(f"variants: unknown variant(s) {unknown}; valid: ir, vi, {', '.join(names)}.")
        if not self.seg_seeds:
            raise ConfigError("seg_seeds: give at least one segmentation seed, e.g. [0].")
        if self.fuse_batch_size < 1:
            raise ConfigError(f"fuse_batch_size={self.fuse_batch_size}: give at least 1 pair per batch.")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"threads={self.threads}: give a thread count of 1 or more, or 0 (or null) to choose "
                              "from the CPUs this process may use.")
        if self.gpus < 1:
            raise ConfigError(f"gpus={self.gpus}: give at least 1 process.")
        if self.executor.kind != "inprocess" and self.launcher == "torchrun":
            raise ConfigError(f"launcher: torchrun and executor.kind: {self.executor.kind} do not combine; give the "
                              "GPUs of each job with executor.gpus_per_job (2 or more runs torchrun inside the job).")

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.name

    def all_variants(self) -> list[str]:
        return ["ir", "vi", *(m.name for m in self.fusion)]


def shipped_configs_dir() -> Path:
    """The folder of the configs that ship with fuseseg: ``pipelines/configs/`` inside an
    installed wheel (copied there from ``configs/`` at build time), else ``configs/`` of the
    source tree."""
    return PACKAGED_CONFIGS if PACKAGED_CONFIGS.is_dir() else REPO_CONFIGS


def shipped_config_names() -> list[str]:
    """Names of the shipped configs (``default``, ``msrs``, ...)."""
    return sorted(p.stem for p in shipped_configs_dir().glob("*.yaml"))


def resolve_config(arg: str | Path | None) -> Path:
    """A config argument as a path: an existing file as given; otherwise the name of a shipped
    config (``default``, ``msrs``, with or without ``.yaml``, or ``configs/NAME.yaml`` as the
    README writes it), so that ``fuseseg run configs/msrs.yaml`` works from any folder.
    ``None`` is ``default``. A ConfigError names the shipped configs when nothing matches."""
    if arg is None:
        arg = "default"
    path = Path(arg)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent in (Path("."), Path("configs")):
        candidate = shipped_configs_dir() / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config {str(arg)!r}: no such file, and no shipped config of that name. Give a "
                      f"YAML file, or one of the shipped configs: {', '.join(shipped_config_names())}.")


def default_config_path() -> Path:
    """The shipped ``default.yaml`` (see :func:`shipped_configs_dir`)."""
    return shipped_configs_dir() / "default.yaml"
