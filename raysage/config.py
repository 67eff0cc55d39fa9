"""One validated configuration object for a simulation.

A :class:`Config` is built from defaults, then a YAML file, then CLI flags
(each later source overrides the earlier). Every field is a flat, typed
value so that every field is also a CLI flag (``--client-lr 0.01``) and a
YAML key (``client_lr: 0.01``). Validation happens in one place and fails
with a one-line :class:`~raysage.errors.ConfigError` naming the field, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Names are checked here (not by importing the algorithm and model modules)
# so that loading a config stays cheap and torch-free; the engine checks that
# each name really maps to an implementation.
ALGORITHM_NAMES = ("fsl_sage", "fedavg", "sl", "splitfed_v1", "splitfed_v2", "fsl_an",
                   "cse_fsl", "sglr")
MODEL_NAMES = ("cnn", "resnet18", "simple_conv", "gpt2")
DATASET_NAMES = ("synthetic", "cifar10", "cifar100", "e2e_synthetic", "e2e")
LANGUAGE_DATASETS = ("e2e_synthetic", "e2e")
GPT2_SIZES = ("tiny", "small", "medium")
TOKENIZER_NAMES = ("byte", "gpt2")
PARTITION_NAMES = ("iid", "dirichlet", "shards")
OPTIMIZER_NAMES = ("adam", "adamw", "sgd")
BACKEND_NAMES = ("ray", "serial")
PROFILE_NAMES = ("uniform", "datacenter", "wifi", "4g-mobile", "heterogeneous")
STRAGGLER_NAMES = ("none", "lognormal", "pareto")
ROUND_POLICY_NAMES = ("wait_all", "deadline", "over_selection")
AUX_INIT_NAMES = ("shared", "per_client")
# For --model gpt2, unless given: the embedded data, and the paper's GPT-2
# batch size and alignment (40 epochs, batch 8, a buffer of 64 sequences).
# Its LoRA dropout draws from torch's global generator, which a worker process has
# one of, so a worker trains one client at a time: one CPU per worker, unless given.
LANGUAGE_DEFAULTS = {"dataset": "e2e_synthetic", "batch_size": 8, "align_epochs": 40,
                     "align_batch_size": 8, "align_buffer": 64, "cpus_per_worker": 1.0}
# For --model simple_conv, unless given: the FSL-SAGE reference code's CIFAR
# training (batch 128, Adam 1e-3 without weight decay).
SIMPLE_CONV_DEFAULTS = {"batch_size": 128, "client_weight_decay": 0.0,
                        "server_weight_decay": 0.0}
MODEL_DEFAULTS = {"gpt2": LANGUAGE_DEFAULTS, "simple_conv": SIMPLE_CONV_DEFAULTS}
# Those the language-model task runs (the paper's comparison on E2E).
LANGUAGE_ALGORITHMS = ("fsl_sage", "cse_fsl", "splitfed_v2", "fedavg")


def _meta(help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
          maximum: float | None = None, exclusive_min: bool = False) -> dict[str, Any]:
    return {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
            "exclusive_min": exclusive_min}


@dataclass
class Config:
    # What to simulate.
    algorithm: str = field(default="fsl_sage", metadata=_meta(
        "algorithm to simulate", choices=ALGORITHM_NAMES))
    model: str = field(default="cnn", metadata=_meta(
        "split model: cnn (small, fast), resnet18 (the paper's split after layer2), "
        "simple_conv (the FSL-SAGE reference code's CIFAR split) or gpt2 (language model)",
        choices=MODEL_NAMES))
    dataset: str = field(default="synthetic", metadata=_meta(
        "dataset: synthetic (embedded, no files), cifar10 or cifar100 (need --data-dir); for "
        "--model gpt2: e2e_synthetic (embedded) or e2e (E2E NLG CSVs in --data-dir)",
        choices=DATASET_NAMES))
    data_dir: str | None = field(default=None, metadata=_meta(
        "folder with cifar-10-batches-py/ or cifar-100-python/, or an .npz file; for e2e, "
        "the folder with trainset.csv and testset.csv"))
    samples_per_client: int | None = field(default=None, metadata=_meta(
        "training samples per client (default: 100 for synthetic, train size / clients otherwise)",
        minimum=1))
    test_samples: int | None = field(default=None, metadata=_meta(
        "test samples (default: 1000 for synthetic, the whole test split otherwise)", minimum=1))
    partition: str = field(default="iid", metadata=_meta(
        "how training data is split over clients", choices=PARTITION_NAMES))
    alpha: float = field(default=0.5, metadata=_meta(
        "Dirichlet concentration (partition=dirichlet); smaller is more skewed",
        minimum=0.0, exclusive_min=True))
    shards_per_client: int = field(default=2, metadata=_meta(
        "label-sorted shards per client (partition=shards)", minimum=1))

    # Federation.
    clients: int = field(default=10, metadata=_meta("number of clients m", minimum=1))
    participation: float = field(default=1.0, metadata=_meta(
        "fraction of clients sampled each round", minimum=0.0, maximum=1.0, exclusive_min=True))
    rounds: int = field(default=10, metadata=_meta("communication rounds T", minimum=1))
    budget_gib: float | None = field(default=None, metadata=_meta(
        "stop after the round in which communication reaches this many GiB (rounds is then "
        "an upper bound)", minimum=0.0, exclusive_min=True))
    local_epochs: int = field(default=1, metadata=_meta("local epochs E per round", minimum=1))
    batch_size: int = field(default=20, metadata=_meta("local batch size B", minimum=1))

    # Optimizers of the client model x_c, server model x_s and auxiliary model x_a.
    client_optimizer: str = field(default="adam", metadata=_meta(
        "optimizer of x_c", choices=OPTIMIZER_NAMES))
    client_lr: float = field(default=1e-3, metadata=_meta(
        "learning rate of x_c", minimum=0.0, exclusive_min=True))
    client_weight_decay: float = field(default=1e-4, metadata=_meta(
        "weight decay of x_c", minimum=0.0))
    server_optimizer: str = field(default="adam", metadata=_meta(
        "optimizer of x_s", choices=OPTIMIZER_NAMES))
    server_lr: float = field(default=1e-3, metadata=_meta(
        "learning rate of x_s", minimum=0.0, exclusive_min=True))
    server_weight_decay: float = field(default=1e-4, metadata=_meta(
        "weight decay of x_s", minimum=0.0))
    aux_optimizer: str = field(default="adam", metadata=_meta(
        "optimizer of x_a when trained (alignment, local-loss methods)", choices=OPTIMIZER_NAMES))
    aux_lr: float = field(default=1e-3, metadata=_meta(
        "learning rate of x_a", minimum=0.0, exclusive_min=True))
    aux_weight_decay: float = field(default=0.0, metadata=_meta(
        "weight decay of x_a", minimum=0.0))
    momentum: float = field(default=0.0, metadata=_meta(
        "momentum of every SGD optimizer", minimum=0.0, maximum=1.0))

    # FSL-SAGE / CSE-FSL parameters.
    server_update_interval: int = field(default=5, metadata=_meta(
        "q: clients upload smashed data every q-th local iteration", minimum=1))
    align_interval: int = field(default=10, metadata=_meta(
        "l: the server aligns auxiliary models in rounds t with t % l == 0", minimum=1))
    align_epochs: int = field(default=100, metadata=_meta(
        "epochs of each alignment", minimum=1))
    align_batch_size: int = field(default=1000, metadata=_meta(
        "batch size of alignment", minimum=1))
    align_buffer: int = field(default=1000, metadata=_meta(
        "smashed samples the server keeps per client for alignment", minimum=1))
    align_blocking: bool = field(default=True, metadata=_meta(
        "the client waits for its aligned auxiliary model (true, as the reference) "
        "or goes on with the old one until it arrives"))
    aux_init: str = field(default="shared", metadata=_meta(
        "FSL-SAGE's initial auxiliary models: shared (every client starts from the same "
        "one, as the reference code) or per_client (each from its own seeded stream)",
        choices=AUX_INIT_NAMES))
    estimate_quality: bool = field(default=True, metadata=_meta(
        "measure, at every upload of FSL-SAGE, CSE-FSL and FSL_AN, the cosine and NMSE "
        "between the gradient the client used and the true cut-layer gradient (an "
        "observer: no simulated bytes or time, no change to training; costs host time)"))

    # SGLR parameters.
    sglr_alpha: float = field(default=0.5, metadata=_meta(
        "SGLR: server learning rate = client_lr * m ** sglr_alpha (0 turns it off)",
        minimum=0.0))
    sglr_phi: float = field(default=0.5, metadata=_meta(
        "SGLR: fraction of clients that receive the averaged cut-layer gradient (< 1)",
        minimum=0.0, maximum=1.0))

    # Simulated world.
    profile: str = field(default="uniform", metadata=_meta(
        "device and link profile preset", choices=PROFILE_NAMES))
    profile_trace: str | None = field(default=None, metadata=_meta(
        "CSV or Parquet trace, one row per client (compute_flops, uplink_mbps, downlink_mbps, "
        "latency_ms, availability); overrides the preset"))
    stragglers: str = field(default="none", metadata=_meta(
        "spread of client compute rates", choices=STRAGGLER_NAMES))
    straggler_param: float = field(default=1.0, metadata=_meta(
        "log-normal sigma, or Pareto shape (smaller: heavier tail of slow clients)",
        minimum=0.0, exclusive_min=True))
    availability: float | None = field(default=None, metadata=_meta(
        "probability a client is reachable in a round (default: from the profile)",
        minimum=0.0, maximum=1.0, exclusive_min=True))
    dropout: float = field(default=0.0, metadata=_meta(
        "probability a participant drops mid-round and loses that round's work",
        minimum=0.0, maximum=1.0))
    round_policy: str = field(default="wait_all", metadata=_meta(
        "when a round ends", choices=ROUND_POLICY_NAMES))
    deadline: float | None = field(default=None, metadata=_meta(
        "simulated seconds after which late clients are dropped (round_policy=deadline)",
        minimum=0.0, exclusive_min=True))
    over_selection: float = field(default=0.3, metadata=_meta(
        "extra fraction of clients sampled under round_policy=over_selection", minimum=0.0))
    server_flops: float = field(default=2e13, metadata=_meta(
        "server compute rate in FLOP/s", minimum=0.0, exclusive_min=True))

    # Execution.
    backend: str = field(default="ray", metadata=_meta(
        "ray (actors) or serial (in-process, same results)", choices=BACKEND_NAMES))
    address: str | None = field(default=None, metadata=_meta(
        "Ray cluster to join: host:port, ray://host:10001 or auto (default: $RAY_ADDRESS, "
        "else start a local one)"))
    workers: int = field(default=0, metadata=_meta(
        "client worker actors (0: as many as the CPUs allow)", minimum=0))
    cpus_per_worker: float = field(default=2.0, metadata=_meta(
        "CPUs reserved per client worker; it trains one client per whole CPU at once, on "
        "threads of one process (fractions allowed)", minimum=0.0))
    client_threads: int = field(default=0, metadata=_meta(
        "clients a worker trains at once, each on its own thread (0: one per whole CPU the "
        "worker reserves; 1 for a GPU worker)", minimum=0))
    gpus_per_worker: float = field(default=0.0, metadata=_meta(
        "GPUs reserved per client worker (fractions such as 0.25 allowed)", minimum=0.0))
    server_cpus: float = field(default=0.0, metadata=_meta(
        "CPUs reserved for the server actor", minimum=0.0))
    server_gpus: float = field(default=0.0, metadata=_meta(
        "GPUs reserved for the server actor", minimum=0.0))
    threads: int = field(default=0, metadata=_meta(
        "torch threads per client thread and for the server (0: the worker's whole CPUs over "
        "its client threads, at least 1)", minimum=0))
    state_memory_mib: int = field(default=1024, metadata=_meta(
        "RAM for per-client state (kept models, optimizer moments, server buffers) in each "
        "worker and in the server, in MiB; the rest spills to disk under the run folder",
        minimum=0))
    dashboard: bool = field(default=False, metadata=_meta(
        "start Ray's dashboard with a local cluster (about 160 MiB more; off by default)"))
    eval_clients: int = field(default=10, metadata=_meta(
        "clients whose own models are evaluated when client models are unshared (SGLR)",
        minimum=1))
    eval_every: int = field(default=1, metadata=_meta(
        "evaluate the global model every this many rounds (and after the last)", minimum=1))
    checkpoint_every: int = field(default=5, metadata=_meta(
        "write a checkpoint every this many rounds and after the last (0: never); a dead "
        "worker or --resume restarts from the latest", minimum=0))
    seed: int = field(default=200, metadata=_meta("seed of every random stream"))

    # Language model (--model gpt2): GPT-2 split fine-tuning with LoRA.
    gpt2_size: str = field(default="tiny", metadata=_meta(
        "GPT-2 size: tiny (tests, CPU), small (124M) or medium (355M)", choices=GPT2_SIZES))
    cut_layer: int = field(default=1, metadata=_meta(
        "transformer blocks on the client (x_c = embeddings + this many blocks)", minimum=1))
    aux_depth: int = field(default=3, metadata=_meta(
        "transformer blocks in the auxiliary model x_a", minimum=1))
    lora_rank: int | None = field(default=None, metadata=_meta(
        "LoRA rank on the query and value projections; 0 trains every weight (default: 4, "
        "the paper's, with --weights-dir; 0 for a random initialisation, where frozen random "
        "weights leave LoRA almost nothing to adapt)", minimum=0))
    lora_alpha: float = field(default=32.0, metadata=_meta("LoRA alpha (scale alpha / rank)",
                                                           minimum=0.0, exclusive_min=True))
    lora_dropout: float = field(default=0.1, metadata=_meta(
        "dropout on the LoRA input", minimum=0.0, maximum=1.0))
    e2e_max_slots: int = field(default=8, metadata=_meta(
        "most slots in an e2e_synthetic meaning representation (3 to 8, as in E2E; fewer "
        "gives shorter sequences)", minimum=3, maximum=8))
    seq_len: int = field(default=256, metadata=_meta(
        "tokens per sequence (longer records are cut, shorter ones padded)", minimum=8))
    tokenizer: str = field(default="byte", metadata=_meta(
        "byte (no files) or gpt2 (vocab.json and merges.txt from --tokenizer-dir or "
        "--weights-dir)", choices=TOKENIZER_NAMES))
    tokenizer_dir: str | None = field(default=None, metadata=_meta(
        "folder with GPT-2's vocab.json and merges.txt (default: --weights-dir)"))
    weights_dir: str | None = field(default=None, metadata=_meta(
        "folder with GPT-2 weights (model.safetensors, config.json); random init if unset"))
    out: str | None = field(default=None, metadata=_meta(
        "run folder (default: runs/<algorithm>-<dataset>-<clients>c-<time>)"))

    # ------------------------------------------------------------------ derived
    @property
    def worker_threads(self) -> int:
        """Clients a worker trains at once. Two threads of one process train about as
        fast as two processes (torch releases the GIL in its kernels) and share one
        copy of torch's 200 MB."""
        if self.client_threads:
            return self.client_threads
        return 1 if self.gpus_per_worker > 0 else max(1, int(self.cpus_per_worker))

    @property
    def torch_threads(self) -> int:
        """torch's threads per client thread (and the server's)."""
        return self.threads or max(1, int(self.cpus_per_worker) // self.worker_threads)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return build_config(self.to_dict(), changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(Config)}


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace(" | None", "").replace("None | ", "")


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or fail naming the field."""
    f = FIELDS[name]
    kind = _type_name(f)
    optional = "None" in str(f.type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config field '{name}' must not be empty; give a {kind}")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}' = {value!r} is not a valid {kind}") from None


def _check(name: str, value: Any) -> None:
    meta = FIELDS[name].metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config field '{name}' = {value!r} is not allowed; choose one of: "
                          + ", ".join(choices))
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None:
        if meta.get("exclusive_min") and not value > low:
            raise ConfigError(f"config field '{name}' = {value!r} must be greater than {low:g}")
        if not meta.get("exclusive_min") and value < low:
            raise ConfigError(f"config field '{name}' = {value!r} must be at least {low:g}")
    if high is not None and value > high:
        raise ConfigError(f"config field '{name}' = {value!r} must be at most {high:g}")


def _check_together(cfg: Config) -> None:
    """Rules that involve more than one field."""
    language = cfg.dataset in LANGUAGE_DATASETS
    if language != (cfg.model == "gpt2"):
        raise ConfigError(f"model '{cfg.model}' does not fit dataset '{cfg.dataset}': use "
                          "--model gpt2 with e2e or e2e_synthetic, and cnn, resnet18 or "
                          "simple_conv with synthetic, cifar10 or cifar100")
    if language and cfg.algorithm not in LANGUAGE_ALGORITHMS:
        raise ConfigError(f"algorithm '{cfg.algorithm}' does not run the language-model task; "
                          "choose one of: " + ", ".join(LANGUAGE_ALGORITHMS))
    if language and cfg.partition != "iid":
        raise ConfigError(f"partition '{cfg.partition}' needs class labels; the language-model "
                          "task splits its records iid (--partition iid)")
    if cfg.dataset == "e2e" and not cfg.data_dir:
        raise ConfigError("dataset 'e2e' needs --data-dir with trainset.csv and testset.csv "
                          "(or use e2e_synthetic)")
    if language and cfg.tokenizer == "gpt2" and not (cfg.tokenizer_dir or cfg.weights_dir):
        raise ConfigError("tokenizer 'gpt2' needs --tokenizer-dir (or --weights-dir) with "
                          "vocab.json and merges.txt")
    if cfg.dataset in ("cifar10", "cifar100") and not cfg.data_dir:
        raise ConfigError(f"dataset '{cfg.dataset}' needs data: pass --data-dir with a folder "
                          "holding the python-format batches or an .npz file")
    if cfg.gpus_per_worker > 1 and not float(cfg.gpus_per_worker).is_integer():
        raise ConfigError(f"config field 'gpus_per_worker' = {cfg.gpus_per_worker} must be a "
                          "fraction below 1 or a whole number of GPUs")
    if cfg.round_policy == "deadline" and cfg.deadline is None:
        raise ConfigError("round_policy 'deadline' needs a deadline: pass --deadline SECONDS "
                          "of simulated time")
    if cfg.sglr_phi >= 1:
        raise ConfigError(f"config field 'sglr_phi' = {cfg.sglr_phi} must be below 1 "
                          "(phi = 1 diverges, as the SGLR paper reports)")
    if cfg.cpus_per_worker == 0 and cfg.gpus_per_worker == 0:
        raise ConfigError("config fields 'cpus_per_worker' and 'gpus_per_worker' are both 0; "
                          "a worker must reserve some CPU or GPU")


def build_config(*sources: dict[str, Any] | None) -> Config:
    """Merge mappings of field -> value (later wins) over the defaults and validate."""
    merged: dict[str, Any] = {}
    for source in sources:
        for key, value in (source or {}).items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"unknown config field '{key}'; known fields: "
                                  + ", ".join(FIELDS))
            merged[name] = value
    values = {name: _coerce(name, value) for name, value in merged.items()}
    for name, value in values.items():
        _check(name, value)
    # A model's reference settings where the defaults (the ResNet-18 reference's)
    # would not reproduce its paper or code.
    for name, value in MODEL_DEFAULTS.get(values.get("model"), {}).items():
        values.setdefault(name, value)
    cfg = Config(**values)
    _check_together(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is "
                          f"{exc.object[exc.start:exc.start + 1]!r}); give a YAML file of "
                          "field: value lines") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value, "
                          f"not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML file (if any), then keyword overrides (None = not given)."""
    file_values = read_yaml(path) if path is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    return build_config(file_values, given)


def save_config(cfg: Config, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_fingerprint(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
