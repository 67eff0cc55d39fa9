"""One validated configuration for a simulation, on pydantic.

A :class:`Config` holds what every run has (what to simulate, the federation,
the optimizers, the simulated world, execution, the language-model task) and
one section of the chosen algorithm's own parameters, ``cfg.params`` (the
algorithm's ``Params`` model: FSL-SAGE's q, l and alignment settings, SGLR's
alpha and phi). It is built from defaults, then a YAML file, then CLI flags,
each later source overriding the earlier.

An algorithm's parameters may be given nested under its name
(``fsl_sage: {align_interval: 5}``, as ``config.yaml`` writes them) or flat
(``align_interval: 5``, as flags do). Flat parameters of another algorithm are
ignored, so one sweep spec can set FSL-SAGE's l beside a grid over several
algorithms. Every error is one :class:`~raysage.errors.ConfigError` line naming
the field, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from .errors import ConfigError
from .params import STRICT, OptimizerName, Section

ModelName = Literal["cnn", "resnet18", "simple_conv", "gpt2"]
DatasetName = Literal["synthetic", "cifar10", "cifar100", "e2e_synthetic", "e2e"]
PartitionName = Literal["iid", "dirichlet", "shards"]
ProfileName = Literal["uniform", "datacenter", "wifi", "4g-mobile", "heterogeneous"]
StragglerName = Literal["none", "lognormal", "pareto"]
RoundPolicyName = Literal["wait_all", "deadline", "over_selection"]
BackendName = Literal["ray", "serial"]
GPT2Size = Literal["tiny", "small", "medium"]
TokenizerName = Literal["byte", "gpt2"]

LANGUAGE_DATASETS = ("e2e_synthetic", "e2e")
# For --model gpt2, unless given: the embedded data and the paper's GPT-2 batch
# size (an algorithm's own defaults for the model are in its Params section).
# Its LoRA dropout draws from torch's global generator, which a worker process has
# one of, so a worker trains one client at a time: one CPU per worker, unless given.
LANGUAGE_DEFAULTS = {"dataset": "e2e_synthetic", "batch_size": 8, "cpus_per_worker": 1.0}
# For --model simple_conv, unless given: the FSL-SAGE reference code's CIFAR
# training (batch 128, Adam 1e-3 without weight decay).
SIMPLE_CONV_DEFAULTS = {"batch_size": 128, "client_weight_decay": 0.0,
                        "server_weight_decay": 0.0}
MODEL_DEFAULTS = {"gpt2": LANGUAGE_DEFAULTS, "simple_conv": SIMPLE_CONV_DEFAULTS}

class Config(BaseModel):
    """Every setting of a simulation; build it with :func:`build_config`."""

    model_config = STRICT

    # What to simulate.
    algorithm: str = Field(
        "fsl_sage",
        description="algorithm to simulate: a name from `raysage algorithms`, or your own class "
        "in a file or module, path/to/my_algo.py:MyAlgo or package.module:MyAlgo")
    model: ModelName = Field(
        "cnn",
        description="split model: cnn (small, fast), resnet18 (the paper's split after layer2), "
        "simple_conv (the FSL-SAGE reference code's CIFAR split) or gpt2 (language model)")
    dataset: DatasetName = Field(
        "synthetic",
        description="dataset: synthetic (embedded, no files), cifar10 or cifar100 (need --data-dir); for "
        "--model gpt2: e2e_synthetic (embedded) or e2e (E2E NLG CSVs in --data-dir)")
    data_dir: str | None = Field(
        None,
        description="folder with cifar-10-batches-py/ or cifar-100-python/, or an .npz file; for e2e, the"
        " folder with trainset.csv and testset.csv")
    samples_per_client: int | None = Field(
        None, ge=1,
        description="training samples per client (default: 100 for synthetic, train size / clients "
        "otherwise)")
    test_samples: int | None = Field(
        None, ge=1,
        description="test samples (default: 1000 for synthetic, the whole test split otherwise)")
    partition: PartitionName = Field(
        "iid",
        description="how training data is split over clients")
    alpha: float = Field(
        0.5, gt=0.0,
        description="Dirichlet concentration (partition=dirichlet); smaller is more skewed")
    shards_per_client: int = Field(
        2, ge=1,
        description="label-sorted shards per client (partition=shards)")

    # Federation.
    clients: int = Field(10, ge=1, description="number of clients m")
    participation: float = Field(
        1.0, gt=0.0, le=1.0,
        description="fraction of clients sampled each round")
    rounds: int = Field(10, ge=1, description="communication rounds T")
    budget_gib: float | None = Field(
        None, gt=0.0,
        description="stop after the round in which communication reaches this many GiB (rounds is then an"
        " upper bound)")
    local_epochs: int = Field(1, ge=1, description="local epochs E per round")
    batch_size: int = Field(20, ge=1, description="local batch size B")

    # Optimizers of the client model x_c and server model x_s (an auxiliary model's
    # are its algorithm's parameters).
    client_optimizer: OptimizerName = Field(
        "adam",
        description="optimizer of x_c")
    client_lr: float = Field(1e-3, gt=0.0, description="learning rate of x_c")
    client_weight_decay: float = Field(1e-4, ge=0.0, description="weight decay of x_c")
    server_optimizer: OptimizerName = Field(
        "adam",
        description="optimizer of x_s")
    server_lr: float = Field(1e-3, gt=0.0, description="learning rate of x_s")
    server_weight_decay: float = Field(1e-4, ge=0.0, description="weight decay of x_s")
    momentum: float = Field(0.0, ge=0.0, le=1.0, description="momentum of every SGD optimizer")

    # Observers: measured beside training, never changing it.
    estimate_quality: bool = Field(
        True,
        description="measure, at every upload of FSL-SAGE, CSE-FSL and FSL_AN, the cosine and NMSE "
        "between the gradient the client used and the true cut-layer gradient (an observer: "
        "no simulated bytes or time, no change to training; costs host time)")

    leakage_uploads: int = Field(
        0, ge=0,
        description="uploads per client and round (a seeded sample) on which leakage is measured:"
        " distance correlation of inputs and smashed data, and a clustering attack on the labels "
        "of smashed data and of cut-layer gradients (an observer; off by default: it costs host "
        "time, 70% of the quick start's later rounds at 2; 2 is what the studies use)")
    inversion: bool = Field(
        False,
        description="at the end of the run, train a decoder on public data (half the test split) "
        "to invert the final client model and report its reconstruction error (costs host time)")
    inversion_epochs: int = Field(30, ge=1, description="epochs of the inversion decoder")

    # Simulated world.
    profile: ProfileName = Field(
        "uniform",
        description="device and link profile preset")
    profile_trace: str | None = Field(
        None,
        description="CSV or Parquet trace, one row per client (compute_flops, uplink_mbps, downlink_mbps,"
        " latency_ms, availability); overrides the preset")
    stragglers: StragglerName = Field(
        "none",
        description="spread of client compute rates")
    straggler_param: float = Field(
        1.0, gt=0.0,
        description="log-normal sigma, or Pareto shape (smaller: heavier tail of slow clients)")
    availability: float | None = Field(
        None, gt=0.0, le=1.0,
        description="probability a client is reachable in a round (default: from the profile)")
    dropout: float = Field(
        0.0, ge=0.0, le=1.0,
        description="probability a participant drops mid-round and loses that round's work")
    round_policy: RoundPolicyName = Field(
        "wait_all",
        description="when a round ends")
    deadline: float | None = Field(
        None, gt=0.0,
        description="simulated seconds after which late clients are dropped (round_policy=deadline)")
    over_selection: float = Field(
        0.3, ge=0.0,
        description="extra fraction of clients sampled under round_policy=over_selection")
    server_flops: float = Field(2e13, gt=0.0, description="server compute rate in FLOP/s")

    # Execution.
    backend: BackendName = Field(
        "ray",
        description="ray (actors) or serial (in-process, same results)")
    address: str | None = Field(
        None,
        description="Ray cluster to join: host:port, ray://host:10001 or auto (default: $RAY_ADDRESS, "
        "else start a local one)")
    workers: int = Field(
        0, ge=0,
        description="client worker actors (0: as many as the CPUs allow)")
    cpus_per_worker: float = Field(
        2.0, ge=0.0,
        description="CPUs reserved per client worker; it trains one client per whole CPU at once, on "
        "threads of one process (fractions allowed)")
    client_threads: int = Field(
        0, ge=0,
        description="clients a worker trains at once, each on its own thread (0: one per whole CPU the "
        "worker reserves; 1 for a GPU worker)")
    cohort: int = Field(
        0, ge=0,
        description="most clients whose shared work (FSL-SAGE's alignments) a worker runs as "
        "one batched computation (0: picked from the working set's size; 1: one at a time)")
    gpus_per_worker: float = Field(
        0.0, ge=0.0,
        description="GPUs reserved per client worker (fractions such as 0.25 allowed)")
    server_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved for the server actor")
    server_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved for the server actor")
    threads: int = Field(
        0, ge=0,
        description="torch threads per client thread and for the server (0: the worker's whole CPUs over "
        "its client threads, at least 1)")
    state_memory_mib: int = Field(
        1024, ge=0,
        description="RAM for per-client state (kept models, optimizer moments, server buffers) in each "
        "worker and in the server, in MiB; the rest spills to disk under the run folder")
    dashboard: bool = Field(
        False,
        description="start Ray's dashboard with a local cluster (its extra processes cost "
        "memory; off by default)")
    tracking: Literal["none", "tensorboard", "mlflow"] = Field(
        "none",
        description="follow the run in TensorBoard (event files in <out>/tensorboard) or MLflow "
        "(its default store, or MLFLOW_TRACKING_URI): the config as parameters, every round's "
        "columns as metrics; needs raysage[tensorboard] or raysage[mlflow]")
    eval_clients: int = Field(
        10, ge=1,
        description="clients whose own models are evaluated when client models are unshared (SGLR)")
    eval_every: int = Field(
        1, ge=1,
        description="evaluate the global model every this many rounds (and after the last)")
    checkpoint_every: int = Field(
        5, ge=0,
        description="write a checkpoint every this many rounds and after the last (0: never); a dead "
        "worker or --resume restarts from the latest")
    seed: int = Field(200, description="seed of every random stream")

    # Language model (--model gpt2): GPT-2 split fine-tuning with LoRA.
    gpt2_size: GPT2Size = Field(
        "tiny",
        description="GPT-2 size: tiny (tests, CPU), small (124M) or medium (355M)")
    cut_layer: int = Field(
        1, ge=1,
        description="transformer blocks on the client (x_c = embeddings + this many blocks)")
    aux_depth: int = Field(3, ge=1, description="transformer blocks in the auxiliary model x_a")
    lora_rank: int | None = Field(
        None, ge=0,
        description="LoRA rank on the query and value projections; 0 trains every weight (default: 4, the"
        " paper's, with --weights-dir; 0 for a random initialisation, where frozen random "
        "weights leave LoRA almost nothing to adapt)")
    lora_alpha: float = Field(32.0, gt=0.0, description="LoRA alpha (scale alpha / rank)")
    lora_dropout: float = Field(0.1, ge=0.0, le=1.0, description="dropout on the LoRA input")
    e2e_max_slots: int = Field(
        8, ge=3, le=8,
        description="most slots in an e2e_synthetic meaning representation (3 to 8, as in E2E; fewer "
        "gives shorter sequences)")
    seq_len: int = Field(
        256, ge=8,
        description="tokens per sequence (longer records are cut, shorter ones padded)")
    tokenizer: TokenizerName = Field(
        "byte",
        description="byte (no files) or gpt2 (vocab.json and merges.txt from --tokenizer-dir or "
        "--weights-dir)")
    tokenizer_dir: str | None = Field(
        None,
        description="folder with GPT-2's vocab.json and merges.txt (default: --weights-dir)")
    weights_dir: str | None = Field(
        None,
        description="folder with GPT-2 weights (model.safetensors, config.json); random init if unset")
    out: str | None = Field(
        None,
        description="run folder (default: runs/<algorithm>-<dataset>-<clients>c-<time>)")


    # The chosen algorithm's own parameters (its Params section), and its name
    # as the key of that section in config.yaml.
    params: Section = Field(default_factory=Section, exclude=True)
    _section: str = PrivateAttr("")

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

    @property
    def section(self) -> str:
        """The key of the algorithm's section in config.yaml: the algorithm's name."""
        return self._section

    def to_dict(self) -> dict[str, Any]:
        """Plain values, the algorithm's parameters nested under its name."""
        out = self.model_dump()
        params = self.params.model_dump()
        return out | {self._section: params} if params else out

    def flat_dict(self) -> dict[str, Any]:
        """Plain values with the algorithm's parameters beside the fields (run.parquet)."""
        return self.model_dump() | self.params.model_dump()

    def replace(self, **changes: Any) -> "Config":
        return build_config(self.to_dict(), changes)


FIELDS: dict[str, Any] = {name: f for name, f in Config.model_fields.items()
                          if name != "params"}
# Where and how a run executes, which changes none of its results (tested across
# backends, workers and memory budgets): sweeps and resumes may vary these freely.
EXECUTION_FIELDS = frozenset({"out", "backend", "address", "workers", "cpus_per_worker", "cohort",
                              "gpus_per_worker", "server_cpus", "server_gpus", "threads",
                              "checkpoint_every", "state_memory_mib", "dashboard",
                              "tracking"})


def parameter_fields(algorithms=None) -> dict[str, Any]:
    """Every algorithm parameter (name -> pydantic field) of the given algorithm classes
    (default: the built-in ones), for flags and for telling flat parameters apart."""
    from .algorithms import ALGORITHMS

    out: dict[str, Any] = {}
    for cls in algorithms or ALGORITHMS.values():
        out.update(cls.Params.model_fields)
    return out


def known_field(name: str, algorithm: str | None = None) -> bool:
    """Whether a flat name is a config field or some algorithm's parameter."""
    from .algorithms import algorithm_class

    extra = [algorithm_class(algorithm)] if algorithm else []
    return name in FIELDS or name in parameter_fields() or (
        bool(extra) and name in extra[0].Params.model_fields)


# ------------------------------------------------------------------ building

def _blank_to_none(name: str, value: Any, field) -> Any:
    """Flags and YAML write an unset optional value as none, null or nothing."""
    optional = "None" in str(field.annotation)
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    return value


def shown(value: Any, limit: int = 60) -> str:
    """A value's repr for a message, cut short: a config may hold anything, at any size."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 4
    short.maxlevel = 2
    text = short.repr(value)
    return text if len(text) <= 2 * limit else text[:2 * limit] + "..."


def _message(exc: ValidationError) -> str:
    """One line for the first problem pydantic found."""
    err = exc.errors()[0]
    name = ".".join(str(part) for part in err["loc"]) or "?"
    value, kind, ctx = err.get("input"), err["type"], err.get("ctx", {})
    said = f"config field '{name}' = {shown(value)}"
    if kind == "extra_forbidden":
        return f"unknown config field '{name}'"
    if kind == "literal_error":
        return f"{said} is not allowed; choose one of: " + ctx.get("expected", "").replace("'", "")
    bounds = {"greater_than": ("must be greater than", "gt"),
              "greater_than_equal": ("must be at least", "ge"),
              "less_than": ("must be below", "lt"),
              "less_than_equal": ("must be at most", "le")}
    if kind in bounds:
        words, key = bounds[kind]
        if isinstance(ctx[key], float):  # a float field: say the number it was read as
            said = f"config field '{name}' = {float(value)!r}"
        return f"{said} {words} {ctx[key]:g}"
    for prefix, type_name in (("int", "int"), ("float", "float"), ("finite", "float"),
                              ("bool", "bool"), ("string", "str")):
        if kind.startswith(prefix):
            return f"{said} is not a valid {type_name}"
    return f"{said}: {err['msg']}"


def _validated(model, values: dict[str, Any]):
    fields = model.model_fields
    cleaned = {k: _blank_to_none(k, v, fields[k]) if k in fields else v
               for k, v in values.items()}
    try:
        return model(**cleaned)
    except ValidationError as exc:
        raise ConfigError(_message(exc)) from None


def build_config(*sources: dict[str, Any] | None, algorithm_cls: type | None = None) -> Config:
    """Merge mappings of field -> value (later wins) over the defaults and validate.

    ``algorithm_cls`` is the algorithm's class when the caller has it already (a
    worker given a user's class by value), so that its name is not resolved again.
    """
    from .algorithms import ALGORITHMS, algorithm_class

    entries = [(str(key).replace("-", "_"), value)
               for source in sources for key, value in (source or {}).items()]
    names = [value for key, value in entries if key == "algorithm"]
    name = names[-1] if names else FIELDS["algorithm"].default
    if not isinstance(name, str):
        raise ConfigError(f"config field 'algorithm' = {shown(name)} is not a name; "
                          "give a name from `raysage algorithms` or path/to/file.py:Class")
    cls = algorithm_cls or algorithm_class(name)
    own = cls.Params.model_fields
    others = set(parameter_fields()) | set(ALGORITHMS)
    # In source order, so a later source wins whether a parameter is given flat
    # (flags) or in the algorithm's section (config.yaml).
    flat: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for key, value in entries:
        if isinstance(value, dict) and key not in FIELDS:
            if key == cls.name:
                params.update({str(k).replace("-", "_"): v for k, v in value.items()})
            elif key not in others:
                raise ConfigError(f"unknown config section '{key}'; a section is named after "
                                  f"its algorithm ({cls.name} here)")
        elif key in own:
            params[key] = value
        elif key in FIELDS:
            flat[key] = value
        elif key not in others:          # else another algorithm's parameter: not this run's
            raise ConfigError(f"unknown config field '{key}'; known fields: "
                              + ", ".join([*FIELDS, *own]))
    model = flat.get("model")
    for field, value in MODEL_DEFAULTS.get(model, {}).items():
        flat.setdefault(field, value)
    for field, value in cls.Params.model_defaults.get(model, {}).items():
        params.setdefault(field, value)
    section = _validated(cls.Params, params)
    cfg = _validated(Config, flat | {"params": section})
    cfg._section = cls.name
    _check_together(cfg, cls)
    return cfg


def _check_together(cfg: Config, algorithm) -> None:
    """Rules that involve more than one field."""
    language = cfg.dataset in LANGUAGE_DATASETS
    if language != (cfg.model == "gpt2"):
        raise ConfigError(f"model '{cfg.model}' does not fit dataset '{cfg.dataset}': use "
                          "--model gpt2 with e2e or e2e_synthetic, and cnn, resnet18 or "
                          "simple_conv with synthetic, cifar10 or cifar100")
    if language and not algorithm.runs_language_task:
        from .algorithms import ALGORITHMS

        able = [name for name, cls in ALGORITHMS.items() if cls.runs_language_task]
        raise ConfigError(f"algorithm '{cfg.algorithm}' does not run the language-model task; "
                          "choose one of: " + ", ".join(able))
    if language and cfg.inversion:
        raise ConfigError("inversion reconstructs images; the language-model task has token "
                          "ids as inputs: drop --inversion")
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
    if cfg.cpus_per_worker == 0 and cfg.gpus_per_worker == 0:
        raise ConfigError("config fields 'cpus_per_worker' and 'gpus_per_worker' are both 0; "
                          "a worker must reserve some CPU or GPU")


def _no_aliases_loader():
    """PyYAML's safe loader without anchors and aliases: a few lines of nested aliases
    expand to billions of nodes (the "billion laughs"), and no config needs them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.name} uses a YAML alias at line {mark.line + 1}; "
                                  "raysage reads no anchors or aliases: write the values out")
            return super().compose_node(parent, index)

    return Loader


def parse_yaml(text: str, where: str) -> Any:
    """YAML text as plain values (safe types, no aliases); one line on bad syntax."""
    import yaml

    loader = _no_aliases_loader()(text)
    loader.name = where
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{line}; fix its syntax") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is "
                          f"{exc.object[exc.start:exc.start + 1]!r}); give a YAML file of "
                          "field: value lines") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value, "
                          f"not a {type(data).__name__}")
    return data


def write_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML file (if any), then keyword overrides (None = not given)."""
    file_values = read_yaml(path) if path is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    return build_config(file_values, given)
