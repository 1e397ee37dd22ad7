"""Typed, sectioned run configuration loaded from YAML.

The dataclass defaults are the paper's ResNet-50 recipe (seed, section B; README, "The training
engine") but for the per-rank batch (the resnet50 preset sets 64); presets in
`hvd_ba/configs/` are small deltas on top, optionally chained with a top-level `base:` key.
Loading rejects unknown keys and wrong types with a one-line error naming the key, so a typo in
a YAML file never silently does nothing (a weak spot of FFCV's configs).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


# ------------------------------------------------------------- what each setting may hold
# A field's metadata declares its allowed values: `one_of(CHOICES)` or a `Range`; `validate`
# walks them (a null value of an optional field passes), then runs the checks that relate fields.

LAYOUTS = ("copy-major", "sample-major")
SHARDS = ("global", "static")
FORMATS = ("auto", "folder", "shards")  # data.format
AUGMENT_KINDS = ("random-resized-crop", "short-side-random-crop", "resize-random-crop")
WORKER_STARTS = ("auto", "fork", "forkserver", "spawn")
BACKENDS = ("horovod", "torch")  # run.backend (hvd_ba/dist.py)
COPIES_ON = ("rank", "ranks")  # data.copies_on
BINDS = ("auto", "none")
GHOST_IMPLS = ("split", "accumulate")
SCHEDULES = ("step", "cosine")
AMPS = ("off", "bf16", "fp16")
WHERES = ("loader", "device")  # augment.where
WARMUP_FROMS = ("base", "zero")  # optim.warmup_from
# model.arch: the networks hvd_ba/models/nets.py builds (it asserts the same names)
ARCHS = ("resnet50", "mobilenet", "alexnet", "small_resnet")
FIXED_WIDTH_ARCHS = ("resnet50", "alexnet")  # torchvision's own: no width multiplier (model.width 1.0)
MOBILENET_NARROWEST = 32  # channels of MobileNet v1's narrowest layer (its stem) at model.width 1


@dataclass(frozen=True)
class Range:
    """The numbers a setting may hold: bounds closed unless `*_open`; None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unit: str = ""  # after a one-sided bound: ">= 8 px"
    says: str | None = None  # the message instead of the bounds'

    def holds(self, value) -> bool:  # written as what is allowed, so that NaN never passes
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.says:
            return self.says
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}{self.unit}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}{self.unit}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def one_of(choices: tuple) -> dict:
    return {"choices": choices}


def at_least(low, unit: str = "") -> dict:
    return {"range": Range(low, unit=unit)}


def above(low, unit: str = "") -> dict:
    return {"range": Range(low, low_open=True, unit=unit)}


def within(low, high, low_open: bool = False, high_open: bool = False, says: str | None = None) -> dict:
    return {"range": Range(low, high, low_open, high_open, says=says)}


WEEK_S = 7 * 86400  # run.stall_timeout and run.checkpoint_timeout: finite, the backends' timeouts derive from them
TIMEOUT = within(0, WEEK_S, low_open=True, says=f"> 0 and at most 7 days ({WEEK_S} s)")


@dataclass
class DataConfig:
    path: str | None = None  # ImageNet-layout root holding train/<class>/*.JPEG and val/<class>/*.JPEG, or a packed folder
    # folder: data.path is an ImageNet-layout folder; shards: a folder written by `python -m hvd_ba pack`
    # (tar shards + index, data/shards.py); auto: shards where data.path holds a pack's train.json
    format: str = field(default="auto", metadata=one_of(FORMATS))
    # The labels of a flat val/ folder (as ImageNet's validation tar extracts, no class folders): the devkit
    # (ILSVRC2012_devkit_t12.tar.gz or its folder), Kaggle's LOC_val_solution.csv, or `<file> <wnid>` lines
    # (hvd_ba/data/imagenet.py). None: val/ has class folders.
    val_labels: str | None = None
    copies: int = field(default=4, metadata=at_least(1))  # M: augmented copies made locally from each decoded image
    # Where the M copies of an image are made. rank: BA, all M on the rank that read the image,
    # from one read and one decode. ranks: repeated augmentation (DeiT's RASampler): each copy on
    # another rank (k = copy x global batch + image, cut into the ranks' M x B samples), which
    # reads and decodes the image itself: M times the reads; each rank's batch holds distinct
    # images where M <= ranks. The same samples either way (a copy drawn from (seed, epoch, file, copy)).
    copies_on: str = field(default="rank", metadata=one_of(COPIES_ON))
    # B: distinct images per rank per step (samples per step = copies * B)
    unique_batch: int = field(default=32, metadata=at_least(1))
    # copy-major: each group of B holds one copy of B distinct images
    layout: str = field(default="copy-major", metadata=one_of(LAYOUTS))
    # global: a fresh (seed, epoch) split each epoch; static: each rank owns a part for the run
    shard: str = field(default="global", metadata=one_of(SHARDS))
    manifest_dir: str | None = "~/.cache/hvd_ba/manifests"  # cached file index of each split; None: list every start
    # loader worker processes per rank; None: derived from the cores the rank has (its CPU mask):
    # on a GPU all but one (at most 12), on CPUs a quarter (at least one from two cores); cluster.loader_split
    workers: int | None = field(default=None, metadata=at_least(0))
    # Loader worker start method. auto: forkserver, started before Horovod's threads (a fork of a rank
    # whose threads hold locks can hang; data/pipeline.worker_start_method); or name one.
    worker_start: str = field(default="auto", metadata=one_of(WORKER_STARTS))
    prefetch: int = field(default=2, metadata=at_least(1))  # batches prefetched per worker
    eval_batch: int = field(default=100, metadata=at_least(1))  # images per evaluation batch, per rank
    # Node-local copy made by `python -m hvd_ba stage` (static shards): images are read from here,
    # the file index still comes from data.path. None: read data.path itself.
    local_path: str | None = None


@dataclass
class AugmentConfig:
    """Per-image augmentation preset, applied independently to each of the M copies
    (hvd_ba/data/augment.py). The defaults are the paper's ResNet-50 preset."""

    # random-resized-crop; short-side-random-crop (AlexNet: shorter side to `resize`, its central
    # resize x resize patch, a random size x size crop); resize-random-crop (resize x resize, crop)
    kind: str = field(default="random-resized-crop", metadata=one_of(AUGMENT_KINDS))
    size: int = field(default=224, metadata=at_least(8, " px"))  # output side, px
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area fraction range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect-ratio range
    resize: int = 256  # short-side- and resize-random-crop: the square the crop is taken from, px
    hflip: float = field(default=0.5, metadata=within(0, 1))  # probability of a horizontal flip
    # AlexNet PCA lighting noise (0.1 in the original); 0: off
    lighting_std: float = field(default=0.0, metadata=at_least(0))
    # loader: workers make the M crops (uint8). device: workers decode once and send the image
    # with its M crop boxes; the training device (the GPU) crops all M*B in one batched call.
    where: str = field(default="loader", metadata=one_of(WHERES))
    canvas: int = 512  # where=device: decoded images are bounded to this long side, px
    eval_resize: int = 256  # evaluation: resize the short side to this, px
    eval_crop: int = 224  # evaluation: then centre-crop to this, px
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel, on [0, 1]
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


PAPER_GHOST_SIZE = 64  # the paper's ghost-BN group, samples: model.ghost_size's default


@dataclass
class ModelConfig:
    arch: str = field(default="resnet50", metadata=one_of(ARCHS))  # the networks of hvd_ba/models/nets.py
    num_classes: int | None = field(default=None, metadata=at_least(2))  # None: the number of class folders in the data
    # samples per ghost-BN group (rank-local); None: plain BN over the rank's batch
    ghost_size: int | None = field(default=PAPER_GHOST_SIZE, metadata=at_least(1))
    # split: one forward, each group normalised on its own; accumulate: one forward/backward per
    # group with gradient accumulation (the authors' way; less activation memory). Same result.
    ghost_impl: str = field(default="split", metadata=one_of(GHOST_IMPLS))
    # width multiplier (mobilenet's alpha, at least 1/32; small_resnet's channels / 24); resnet50 and
    # alexnet have none (1.0 only): width_problem
    width: float = field(default=1.0, metadata=above(0))
    zero_init_residual: bool = True  # last BN gamma of each residual block starts at 0 (Goyal et al.)
    # small_resnet only: dropout before the classifier (AlexNet-style); 0: none
    dropout: float = field(default=0.0, metadata=within(0, 1, high_open=True))


@dataclass
class OptimConfig:
    # LR for a unique global batch of reference_batch (linear scaling)
    base_lr: float = field(default=0.1, metadata=above(0))
    reference_batch: int = field(default=256, metadata=at_least(1))
    momentum: float = field(default=0.9, metadata=within(0, 1, high_open=True))
    nesterov: bool = False
    weight_decay: float = field(default=1e-4, metadata=at_least(0))  # applied to every parameter except batch-norm ones
    decay_biases: bool = True  # false: biases get no weight decay either (a common option)
    label_smoothing: float = field(default=0.0, metadata=within(0, 1, high_open=True))
    # step: milestones x decay; cosine: half cosine to 0 after warmup
    schedule: str = field(default="step", metadata=one_of(SCHEDULES))
    fp16_allreduce: bool = False  # gradients fp16 on the wire (Horovod's compression; DDP's fp16 hook)
    adasum: bool = False  # Horovod Adasum reduction instead of averaging
    gradient_predivide_factor: float = field(default=1.0, metadata=above(0))
    epochs: int = field(default=90, metadata=at_least(1))
    warmup_epochs: float = 5.0  # per-iteration linear warmup to the peak LR (Goyal et al. 2017)
    # base: the warmup starts at base_lr (the LR of reference_batch unique images) at iteration 0,
    # as Goyal et al. and their code; zero: from 0 (many modern recipes)
    warmup_from: str = field(default="base", metadata=one_of(WARMUP_FROMS))
    milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])  # epochs
    decay: float = field(default=0.1, metadata=within(0, 1, low_open=True))  # LR factor at each milestone


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, steps.jsonl, result.json
    seed: int = 0
    log_every: int = field(default=20, metadata=at_least(1))  # steps between progress lines / steps.jsonl records
    # epochs between evaluations (the last epoch is always evaluated)
    eval_every: int = field(default=1, metadata=at_least(1))
    # torch intra-op threads per rank; 0: the rank's cores (CPU mask) less its loader workers
    threads: int = field(default=0, metadata=at_least(0))
    # auto: inside a Slurm job, a rank whose CPU mask holds the cores of all its node's ranks
    # (horovodrun, mpirun --bind-to none) keeps its local rank's --cpus-per-task share; none: as launched
    bind: str = field(default="auto", metadata=one_of(BINDS))
    # How the ranks talk: horovod (Horovod over Gloo or MPI; launch with horovodrun, srun or mpirun)
    # or torch (torch.distributed, DistributedDataParallel: Gloo on CPUs, NCCL on GPUs; launch
    # with torchrun, srun or mpirun; needs no Horovod installed). hvd_ba/dist.py.
    backend: str = field(default="horovod", metadata=one_of(BACKENDS))
    max_steps_per_epoch: int | None = field(default=None, metadata=at_least(1))  # cut epochs short (tests, smoke runs)
    resume: str | None = None  # auto: the newest valid checkpoint of out_dir (fresh start if none); or a file
    # A fresh start in an out_dir that holds a run is refused; true: move that run aside to
    # <out_dir>.old-<time> (never deleted) and start afresh.
    overwrite: bool = False
    # Seconds a rank may go without progress (a batch from its loader, a step, an evaluation
    # batch) before the job is ended with a message naming the rank, host and what it waited for.
    # Start-up (listing, resume) is not timed. Horovod's stall shutdown and the torch process-group
    # timeout, the backends' backstops, are max(1 h, 4 x this, 1.5 x checkpoint_timeout).
    stall_timeout: float = field(default=300.0, metadata=TIMEOUT)
    # Seconds rank 0 may take to write a checkpoint (the file and folder fsyncs), the other ranks
    # waiting for it, before the job is ended as stalled. Longer than stall_timeout: a loaded
    # parallel file system can take minutes to fsync (this machine's disk once took 144 s for a
    # 5.6 MB checkpoint); a write that never returns (a hung mount) still ends the job.
    checkpoint_timeout: float = field(default=1800.0, metadata=TIMEOUT)
    # A run holds its folder with a lock (run.out_dir/.lock: host, pid, Slurm job, start time) whose
    # mtime is refreshed every minute. A lock from another host is taken for abandoned (its holder
    # crashed with the node) once it was not refreshed for this many seconds.
    lock_stale_after: float = field(default=900.0, metadata=above(0, " seconds"))
    # steps between checkpoints (one is also written at each epoch end)
    checkpoint_every: int | None = field(default=None, metadata=at_least(1))
    keep_checkpoints: int = field(default=3, metadata=at_least(1))  # the newest K are kept
    # steps between the ranks' agreement on stop requests (preemption signals) and finite losses:
    # one small allreduce, a full synchronisation of the ranks, so not every step
    sync_every: int = field(default=10, metadata=at_least(1))
    # A file whose appearance asks for a stop exactly as SIGUSR1 does (checked by local rank 0 of
    # each node at each agreement; '$SLURMD_NODENAME' in it names a node's own file): how a batch
    # script reaches ranks that horovodrun or mpirun started on other nodes.
    stop_file: str | None = None
    # Every N steps, lambda_max (top eigenvalue of the batch-averaged loss Hessian; hvd_ba/theory/tracking.py)
    # of `track_lambda_batches` batches of each kind (plain B, BA B x M, plain M*B) at the current
    # weights, into lambda.jsonl. Collective and costly (tens of Hessian-vector products); None: off.
    track_lambda_every: int | None = field(default=None, metadata=at_least(1))
    track_lambda_batches: int = field(default=1, metadata=at_least(1))
    amp: str = field(default="off", metadata=one_of(AMPS))  # off | bf16 | fp16 (fp16 with a GradScaler; CUDA)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    record_reads: bool = False  # write each rank's list of file indices read per epoch (tests)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}

# ------------------------------------------------------------------------------------- loading


def _check_type(key: str, value, annotation):
    """Return value converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML 1.1 reads `1e-4` as a string; accept any string that is a plain float literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {key}")  # a bug in this module


def _resolve_preset(name: str) -> Path:
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_suffix(".yaml")
    if path.is_file():
        return path
    shipped = CONFIG_DIR / path.name
    if shipped.is_file():
        return shipped
    if Path(name).is_dir():  # after the presets: a folder runs/demo beside a user must not hide `demo`
        raise ConfigError(f"config file '{name}': a folder, not a YAML file")
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name}' not found (shipped presets: {known})")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a preset, merging it over its `base:` chain."""
    import yaml  # PyYAML, where a file is read, not at import: bench/gpu_check.py runs without it

    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}': 'base' chain loops")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}': not valid YAML ({err})".replace("\n", " ")) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}': not a text file (UTF-8 YAML expected)") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}': cannot be read ({err.strerror or err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of sections")
    raw.pop("run_id", None)  # a run's config.yaml used as a preset: the id belongs to that run
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml(_resolve_preset(base), seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_override(text: str) -> tuple[str, object]:
    """`section.key=value` -> (dotted key, YAML-parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': expected section.key=value, e.g. data.copies=8")
    import yaml

    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': not valid YAML ({err})".replace("\n", " ")) from None
    return key.strip(), parsed


def from_dict(raw: dict) -> Config:
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}': expected a mapping, got {values!r}")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(hints)
                raise ConfigError(f"unknown config key '{section}.{key}' (known in {section}: {known})")
            setattr(target, key, _check_type(f"{section}.{key}", value, hints[key]))
    validate(cfg)
    return cfg


def load_config(preset: str = "resnet50", overrides: list[str] | tuple = ()) -> Config:
    raw = _read_yaml(_resolve_preset(preset))
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section '{section}': expected a mapping")
        raw[section][name] = value
    cfg = from_dict(raw)
    # Expanded in each process, so '$SLURMD_NODENAME' or '$SLURM_JOB_ID' can name per-node folders.
    for section, name in (("data", "local_path"), ("data", "manifest_dir"), ("run", "stop_file")):
        value = getattr(getattr(cfg, section), name)
        if value:
            expanded = os.path.expandvars(value)
            if "$" in expanded:
                raise ConfigError(f"config key '{section}.{name}': {value!r} names an unset environment variable")
            setattr(getattr(cfg, section), name, expanded)
    return cfg


def config_yaml(cfg: Config, run_id: str | None = None) -> str:
    """The resolved config as block-style YAML, sections in order (with the run's id on top when
    given; loading drops it)."""
    import yaml

    head = {"run_id": run_id} if run_id else {}
    return yaml.safe_dump({**head, **cfg.to_dict()}, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: Path, run_id: str | None = None) -> None:
    """config_yaml, written atomically."""
    from hvd_ba.fsio import atomic_write

    atomic_write(path, config_yaml(cfg, run_id))


# ---------------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _check_declared(cfg: Config) -> None:
    """Every field against what its metadata declares (one_of, Range); null passes where allowed."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            value, key = getattr(values, f.name), f"{section.name}.{f.name}"
            if value is None:
                continue
            choices, bounds = f.metadata.get("choices"), f.metadata.get("range")
            if choices is not None:
                _require(value in choices, key, f"must be one of {choices}, got {value!r}")
            if bounds is not None:
                nullable = " or null" if type(None) in typing.get_args(hints[f.name]) else ""
                _require(bounds.holds(value), key, f"must be {bounds.describe()}{nullable}, got {value}")


def width_problem(arch: str, width: float) -> str | None:
    """Why models/nets.py cannot build `arch` at `width` (None: it can). Checked with the config,
    before any rank starts, and by build_model."""
    if arch in FIXED_WIDTH_ARCHS and width != 1.0:
        return f"{arch} has no width multiplier here (use 1.0), got {width}"
    if arch == "mobilenet" and int(MOBILENET_NARROWEST * width) < 1:
        return (f"{width} leaves mobilenet's narrowest layer no channel (int({MOBILENET_NARROWEST} x width) = 0; "
                f"at least 1/{MOBILENET_NARROWEST})")
    return None


def _check_data(d: DataConfig, a: AugmentConfig) -> None:
    _require(not (d.copies_on == "ranks" and d.shard == "static"), "data.copies_on",
             "ranks reads each image on several ranks, which static shards (one owner per file) forbid: "
             "set data.shard=global")
    _require(not (d.copies_on == "ranks" and a.where == "device"), "data.copies_on",
             "ranks makes one copy per item on the loader; augment.where=device is for BA (data.copies_on=rank)")


def _check_augment(a: AugmentConfig) -> None:
    for key, pair, low in (("augment.scale", a.scale, 0.0), ("augment.ratio", a.ratio, 0.0)):
        _require(len(pair) == 2 and low < pair[0] <= pair[1], key, f"must be [low, high] with 0 < low <= high, got {pair}")
    _require(a.scale[1] <= 1.0, "augment.scale", f"upper bound must be <= 1, got {a.scale[1]}")
    _require(a.eval_crop <= a.eval_resize, "augment.eval_crop", f"{a.eval_crop} exceeds augment.eval_resize {a.eval_resize}")
    if a.kind in ("short-side-random-crop", "resize-random-crop"):
        _require(a.resize >= a.size, "augment.resize", f"{a.resize} is below augment.size {a.size}")
    _require(a.canvas >= a.size, "augment.canvas", f"{a.canvas} is below augment.size {a.size}")
    _require(len(a.mean) == 3 and len(a.std) == 3 and min(a.std) > 0, "augment.std", "mean and std need 3 channels, std > 0")


def _check_model(m: ModelConfig, d: DataConfig) -> None:
    if m.ghost_size is not None:
        samples = d.copies * d.unique_batch  # Derived.samples_per_rank, checked before a config is valid
        _require(
            samples % m.ghost_size == 0,
            "model.ghost_size",
            f"{m.ghost_size} does not divide the samples per rank per step "
            f"(data.copies {d.copies} x data.unique_batch {d.unique_batch} = {samples})",
        )
    if m.ghost_impl == "accumulate":
        _require(m.ghost_size is not None, "model.ghost_impl", "accumulate needs model.ghost_size")
    _require(width_problem(m.arch, m.width) is None, "model.width", width_problem(m.arch, m.width) or "")
    _require(m.dropout == 0 or m.arch == "small_resnet", "model.dropout",
             f"only small_resnet takes a dropout here ({m.arch} has its own or none)")


def _check_optim(o: OptimConfig, r: RunConfig) -> None:
    _require(not (o.adasum and o.gradient_predivide_factor != 1.0), "optim.gradient_predivide_factor",
             "must be 1 with optim.adasum (Horovod does not combine them)")
    _require(not (r.backend == "torch" and o.adasum), "optim.adasum",
             "Horovod's Adasum has no torch.distributed counterpart: set run.backend=horovod, or optim.adasum=false")
    _require(not (r.backend == "torch" and o.gradient_predivide_factor != 1.0), "optim.gradient_predivide_factor",
             "has no torch.distributed counterpart (DDP divides before its sum): set it to 1, or run.backend=horovod")
    _require(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", f"must be in [0, optim.epochs], got {o.warmup_epochs}")
    _require(list(o.milestones) == sorted(o.milestones), "optim.milestones", f"must be increasing, got {o.milestones}")


def _check_run(r: RunConfig) -> None:
    _require(not (r.resume and r.overwrite), "run.overwrite",
             "cannot be combined with run.resume (continue the run, or move it aside and start afresh)")


def validate(cfg: Config) -> None:
    """Checks that need no files; `check_paths` does those that do, before any rank trains. First
    each field on its own (its declared choices or range), then the checks that relate fields."""
    _check_declared(cfg)
    _check_data(cfg.data, cfg.augment)
    _check_augment(cfg.augment)
    _check_model(cfg.model, cfg.data)
    _check_optim(cfg.optim, cfg.run)
    _check_run(cfg.run)


def where() -> str:
    """' on host H (rank r of w)' for messages of a process started by a launcher; '' alone."""
    from hvd_ba.cluster import launch_rank

    rank, world = launch_rank()
    return f" on host {socket.gethostname()} (rank {rank} of {world})" if world > 1 else ""


def check_paths(cfg: Config) -> None:
    """File-system checks, run on the launching process before Horovod starts any rank."""
    if cfg.data.path is None:
        raise ConfigError("config key 'data.path': not set (the ImageNet-layout root with train/ and val/)")
    root = Path(cfg.data.path)
    if data_format(cfg) == "shards":
        for split in ("train", "val"):
            if not (root / f"{split}.json").is_file():
                raise ConfigError(f"config key 'data.path': packed folder '{root}' has no {split}.json{where()} (an "
                                  "unfinished pack? run `python -m hvd_ba pack` again to finish it)")
    else:
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ConfigError(f"config key 'data.path': data directory '{root / split}' does not exist{where()}")
    if cfg.data.local_path is not None:
        if cfg.data.shard != "static":
            raise ConfigError("config key 'data.local_path': a node-local copy holds static shards; "
                              f"set data.shard=static (it is {cfg.data.shard!r})")
        if not Path(cfg.data.local_path).is_dir():
            raise ConfigError(f"config key 'data.local_path': staged copy '{cfg.data.local_path}' does not exist"
                              f"{where()}; run `python -m hvd_ba stage` on every node first")
    out = Path(cfg.run.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks check concurrently
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"config key 'run.out_dir': cannot write to '{out}' ({err.strerror})") from None


# ------------------------------------------------------------------ what a config implies


def peak_lr(base_lr: float, unique_global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling by the *unique* global batch (Goyal et al. 2017); M does not change it."""
    return base_lr * unique_global_batch / reference_batch


def steps_per_epoch(train_files: int, world: int, unique_batch: int, max_steps: int | None = None,
                    per_rank: int | None = None) -> int:
    """Steps of one epoch: the files each rank gets (train_files // world, or `per_rank`: static
    parts of whole packed shards, data/shards.py files_per_rank) in batches of unique_batch (the
    remainder is skipped, every rank taking the same number of steps), capped by
    run.max_steps_per_epoch. data/pipeline.py: ShardSampler takes this."""
    steps = (train_files // world if per_rank is None else per_rank) // unique_batch
    return min(steps, max_steps) if max_steps is not None else steps


@dataclasses.dataclass(frozen=True)
class Derived:
    """The figures a config implies on `world` ranks, computed here once for plan, train,
    analyze and the benches."""

    world: int
    unique_batch: int  # B per rank
    copies: int  # M
    unique_global: int  # B x world: what the LR and the steps per epoch follow
    samples_per_rank: int  # M x B per step
    samples_global: int
    ghost_size: int | None
    ghost_groups: int | None  # ghost-BN groups per rank per step (None: plain BN over the rank's batch)
    forward_passes: int  # per step: one per ghost group with model.ghost_impl=accumulate, else 1
    peak_lr: float
    steps_per_epoch: int | None  # None when the number of training files is not given


def derive(cfg: Config, world: int, train_files: int | None = None) -> Derived:
    d, m, o = cfg.data, cfg.model, cfg.optim
    samples, unique_global = d.copies * d.unique_batch, d.unique_batch * world
    groups = samples // m.ghost_size if m.ghost_size else None
    return Derived(
        world=world, unique_batch=d.unique_batch, copies=d.copies, unique_global=unique_global,
        samples_per_rank=samples, samples_global=samples * world, ghost_size=m.ghost_size, ghost_groups=groups,
        forward_passes=groups if m.ghost_impl == "accumulate" and groups else 1,
        peak_lr=peak_lr(o.base_lr, unique_global, o.reference_batch),
        steps_per_epoch=None if train_files is None else steps_per_epoch(train_files, world, d.unique_batch,
                                                                          cfg.run.max_steps_per_epoch),
    )


def data_format(cfg: Config) -> str:
    """data.format resolved: `shards` where data.path is a packed folder (auto) or says so, else `folder`."""
    if cfg.data.format != "auto":
        return cfg.data.format
    return "shards" if cfg.data.path and (Path(cfg.data.path) / "train.json").is_file() else "folder"


def manifest_cache(cfg: Config) -> str | None:
    """The folder of the cached file indexes (data.manifest_dir, ~ expanded); None: list every start."""
    return os.path.expanduser(cfg.data.manifest_dir) if cfg.data.manifest_dir else None
