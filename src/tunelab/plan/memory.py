"""Peak memory and step time of a recipe, predicted before the run (`tunelab plan`).

Parameters are not estimated: the model is built on the ``meta`` device (shapes only, no memory)
from its config, the recipe's method is applied to it exactly as training applies it, and every
parameter is counted with the dtype it will have (PEFT keeps adapters in fp32; QLoRA's
``prepare_model_for_kbit_training`` moves norms and embeddings to fp32; a ``Params4bit`` weight is
NF4). Gradients have the trainable parameters' dtype; torch AdamW keeps two states per parameter in
that dtype too, the bitsandbytes 8-bit variant one byte each.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", §4.1): count, per layer and token, the bytes of every tensor autograd saves for backward.
Their ``sbh(34 + 5as/h)`` is for GPT with a 4h GELU MLP, dropout and eager attention; this module
redoes the count for the Hugging Face Llama-family layer (RMSNorm, rotary embeddings, SwiGLU,
grouped-query attention, no dropout) with SDPA, whose fused kernels save the output and the
log-sum-exp instead of the ``as²`` score matrix. Which tensors are saved depends on what trains
(a frozen linear does not keep its input; LoRA keeps a copy cast to its own dtype), so the terms
are read off the method-prepared meta model. ``tests/test_plan_memory.py`` checks the per-layer
count against torch's own saved-tensor hooks and the whole step's peak against a live-bytes tracker.

Assumptions, each a line in :func:`layer_bytes_per_token` or :func:`estimate`:

- every sequence is ``data.max_length`` tokens long and every position carries loss (the worst
  case a micro-batch can reach; padding is computed like real tokens);
- with SDPA or eager attention, padded batches and packed ones alike (packing builds a
  block-diagonal mask) give the kernel a mask of ``b·s²`` elements, materialised per layer; the
  varlen kernels (``model.attention`` varlen, flash_attention_2 or flex_attention, as ``auto`` picks on
  CUDA) take none, and a packed micro-batch of ``b`` rows is ``b·s`` tokens like a padded one;
- with gradient checkpointing (transformers' non-reentrant, per decoder layer) a checkpointed layer
  keeps only its input, and backward recomputes one layer at a time; with ``checkpoint_every: k``
  layers 0, k, 2k, ... (``ceil(L/k)`` of them) are checkpointed and the others keep everything;
- ``offload_activations`` moves the checkpointed layers' inputs to host memory (reported as host
  bytes, not device bytes); backward brings one back at a time. On a CPU run nothing moves;
- the language-model loss upcasts the kept logits to fp32: at the start of backward the log-softmax
  output, its gradient and the gradient of the cross-entropy coexist (``12·k·V`` bytes for ``k``
  loss positions);
- on CUDA the allocator's context (~0.5 GiB) is not in ``max_memory_allocated`` but takes memory.

Step time is FLOPs over an assumed fraction of the device's dense bf16 peak: ``6N`` per token for
full fine-tuning, ``4N`` when base weights are frozen (no weight gradients), ``+2N`` to recompute
the forward of each checkpointed layer, plus causal attention ``6·L·h·s``. Offload's copies over
the host link are not in the step time.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tunelab.data.packing import packing_in_effect
from tunelab.models.attention import VARLEN_ATTENTION, AttentionUnavailable, FastPath
from tunelab.objectives import OBJECTIVES
from tunelab.plan.gpus import GIB, Gpu

CUDA_CONTEXT_BYTES = int(0.5 * GIB)
"""CUDA context plus cuBLAS/cuDNN handles: outside ``max_memory_allocated``, inside the device's memory."""
FIT_HEADROOM = 0.92
"""Fraction of usable memory a plan may fill; the rest absorbs allocator fragmentation."""
ASSUMED_MFU = 0.40
"""Model-FLOPs utilisation assumed for the step-time estimate: what well-fed dense bf16 training of
1B-8B models reaches on A100/H100 (PaLM reports 46%, Llama-style HF training 30-50%)."""
NF4_BYTES_PER_PARAM = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
"""NF4 packs two weights per byte; absmax per 64-weight block is fp32, or with double quantisation
8-bit plus an fp32 constant per 256 blocks (Dettmers et al. 2023, QLoRA §3)."""
MAX_SEARCH_BATCH = 4096
_LAYER_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder-only transformer that activations depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


@dataclass(frozen=True)
class Linear:
    """One projection of a decoder layer: input width, whether its weight trains, its LoRA rank."""

    d_in: int
    d_out: int
    trains: bool
    lora_r: int = 0


@dataclass(frozen=True)
class ModelFacts:
    """What the method-prepared (meta-device) model says about bytes and saved tensors."""

    arch: Architecture
    weight_bytes: int
    trainable_params: int
    trainable_bytes: int
    largest_trainable_bytes: int
    param_bytes: int
    """Element size of the trainable parameters (gradients and AdamW states share it)."""
    matmul_params: int
    """Weights of the decoder layers' linear layers (the 2N-FLOPs-per-token part)."""
    linears: dict[str, Linear]
    norms_train: bool
    head_trains: bool
    head_grad_bytes: int
    """Gradient of the output head, the first to arrive in backward (0 when the head is frozen)."""
    lora_bytes: int
    """Element size of LoRA weights (fp32: PEFT upcasts adapters of a half-precision base)."""
    llama_shaped: bool


@dataclass(frozen=True)
class Regime:
    """How the run executes: device, precision, batch shape, memory savers."""

    device: str
    compute_bytes: int
    autocast: bool
    optimizer: str
    checkpointing: bool
    dense_mask: bool
    """SDPA/eager get a ``(b, 1, s, s)`` mask: padded batches, and packed ones (block-diagonal);
    the varlen kernels (flash, flex) take none."""
    seq_len: int
    grad_accum: int
    fused_loss: bool = False  # SFT's objective.fused_cross_entropy: no whole logits tensor
    checkpoint_every: int = 1  # with checkpointing: layers 0, k, 2k, ... are checkpointed
    offload: bool = False  # the checkpointed layers' inputs live in host memory (never on a CPU run)


@dataclass
class MemoryPlan:
    """A predicted breakdown (bytes) of one micro-batch's training step, its peak and its speed."""

    model: str
    method: str
    device: str
    micro_batch: int
    seq_len: int
    components: dict[str, int]
    peak_allocated: int
    """What ``torch.cuda.max_memory_allocated`` should read after the step."""
    device_total: int
    """Peak allocated plus the CUDA context: what must fit in the device's memory."""
    capacity: int | None
    step_time_s: float | None
    flops_per_token: float
    notes: list[str] = field(default_factory=list)
    host_bytes: int = 0
    """Activations offloaded to host memory (pinned RAM on CUDA), outside ``device_total``."""

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.device_total <= self.capacity * FIT_HEADROOM

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "device": self.device,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "components_bytes": self.components,
            "peak_allocated_bytes": self.peak_allocated,
            "device_total_bytes": self.device_total,
            "capacity_bytes": self.capacity,
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "flops_per_token": self.flops_per_token,
            "notes": self.notes,
            "host_bytes": self.host_bytes,
        }


# ---------------------------------------------------------------- the model, counted on `meta`


def model_config(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of any model spec tunelab loads, without reading weights."""
    from tunelab.models.load import load_config  # noqa: PLC0415

    return load_config(spec, trust_remote_code=trust_remote_code)


def prepared_on_meta(config: Any, method_cfg: Any, dtype: torch.dtype) -> nn.Module:
    """The model as the method leaves it, with shapes and dtypes but no storage."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from tunelab.methods import METHODS  # noqa: PLC0415

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # deprecation chatter from PEFT/transformers, not the user's concern
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        prepared = METHODS.get(method_cfg.name).impl.apply(model, method_cfg, weight_decay=0.0)
    return prepared.model


def model_facts(model: nn.Module, config: Any, *, double_quant: bool = True) -> ModelFacts:
    """Count bytes of the prepared meta model and read which tensors a decoder layer will save."""
    weight_bytes = trainable = trainable_bytes = largest = 0
    param_bytes, lora_bytes = 2, 4
    for param in model.parameters():
        if type(param).__name__ == "Params4bit":  # on meta it keeps its dense shape; stored as NF4
            weight_bytes += math.ceil(param.numel() * NF4_BYTES_PER_PARAM[double_quant])
            continue
        size = param.numel() * param.element_size()
        weight_bytes += size
        if param.requires_grad:
            trainable += param.numel()
            trainable_bytes += size
            largest = max(largest, size)
            param_bytes = param.element_size()
    linears, norms_train, last = _last_layer(model)
    lora_sizes = [p.element_size() for n, p in model.named_parameters() if "lora_A" in n]
    if lora_sizes:
        lora_bytes = lora_sizes[0]
    arch = Architecture.from_config(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    head_trains = bool(head_weight is not None and head_weight.requires_grad)
    return ModelFacts(
        arch=arch,
        weight_bytes=weight_bytes,
        trainable_params=trainable,
        trainable_bytes=trainable_bytes,
        largest_trainable_bytes=largest,
        param_bytes=param_bytes,
        matmul_params=arch.layers * sum(lin.d_in * lin.d_out for lin in linears.values()),
        linears=linears,
        norms_train=norms_train,
        head_trains=head_trains,
        head_grad_bytes=head_weight.numel() * head_weight.element_size() if head_trains else 0,
        lora_bytes=lora_bytes,
        llama_shaped=set(linears) == set(_LAYER_ROLES),
    )


def _last_layer(model: nn.Module) -> tuple[dict[str, Linear], bool, int]:
    """Projections of the last decoder layer (the one most likely to train under layer freezing)."""
    params = dict(model.named_parameters())
    indices = [int(m.group(1)) for n in params if (m := _LAYER.search(n))]
    last = max(indices, default=0)
    marker = f"layers.{last}."
    linears: dict[str, Linear] = {}
    norms_train = False
    for name, param in params.items():
        if marker not in name:
            continue
        tail = name.split(marker, 1)[1]
        role = next((r for r in _LAYER_ROLES if f"{r}." in tail), None)
        if role is None:
            norms_train |= "norm" in tail and param.requires_grad
            continue
        current = linears.get(role, Linear(0, 0, False))
        if "lora_A" in tail:
            current = replace(current, lora_r=param.shape[0])
        elif tail.endswith(("weight",)) and "lora_" not in tail and param.ndim == 2:
            current = replace(current, d_in=param.shape[1], d_out=param.shape[0], trains=param.requires_grad)
        linears[role] = current
    return linears, norms_train, last


# ---------------------------------------------------------------- activations


def layer_bytes_per_token(facts: ModelFacts, regime: Regime) -> dict[str, float]:
    """Bytes one decoder layer saves for backward, per token, by term (see the module docstring).

    ``a`` is the activation element size. The terms, in the order the layer runs:
    """
    a, arch = regime.compute_bytes, facts.arch
    h, i = arch.hidden, arch.intermediate
    lin = facts.linears
    terms: dict[str, float] = {}
    # two RMSNorms: the input upcast to fp32 (saved by pow and mul) and rsqrt per token; the
    # normalised tensor only when the norm weight trains (weight * x saves x for the weight's grad)
    terms["norms"] = 2 * (4 * h + 4 + (a * h if facts.norms_train else 0))
    # a norm's output is saved once if any consumer keeps it: a linear whose weight trains, or a
    # LoRA whose dtype equals the activations' (no cast, so it saves the very same tensor)
    shares = not regime.autocast and facts.lora_bytes == a
    attn_in = any(
        lin[r].trains or (lin[r].lora_r and shares) for r in ("q_proj", "k_proj", "v_proj") if r in lin
    )
    mlp_in = any(lin[r].trains or (lin[r].lora_r and shares) for r in ("gate_proj", "up_proj") if r in lin)
    terms["norm outputs"] = a * h * (attn_in + mlp_in)
    # SDPA keeps rotated q, k and v, its output (also o_proj's input) and a fp32 log-sum-exp per
    # head; with a padding mask transformers repeats k/v to every head (use_gqa_in_sdpa) and the
    # kernel keeps its own (b, 1, s, s) copy of the mask in the activation dtype
    kv_width = h if regime.dense_mask else arch.kv_heads * arch.head_dim
    terms["attention"] = a * (arch.heads * arch.head_dim + 2 * kv_width + h) + 4 * arch.heads
    if regime.dense_mask:
        terms["attention mask"] = a * regime.seq_len
    # SwiGLU: gate (silu's input), silu(gate) and up (the product's inputs), and the product when
    # down_proj's weight trains
    down = lin.get("down_proj", Linear(i, h, True))
    terms["mlp"] = a * i * (3 + (down.trains or bool(down.lora_r and shares)))
    terms["lora"] = sum(_lora_bytes_per_token(x, regime, facts.lora_bytes) for x in lin.values() if x.lora_r)
    return {k: v for k, v in terms.items() if v}


def _lora_bytes_per_token(linear: Linear, regime: Regime, lora_bytes: int) -> float:
    """PEFT casts the input to the adapter's dtype (fp32) before lora_A; under autocast the matmul
    casts it back to half precision and saves that copy, without autocast it saves the fp32 copy.
    Either way each adapted projection keeps its own copy, plus lora_A's r outputs for lora_B."""
    if regime.autocast:
        return 2 * (linear.d_in + linear.lora_r)
    copy = 0 if lora_bytes == regime.compute_bytes else lora_bytes * linear.d_in
    return copy + lora_bytes * linear.lora_r


def logits_bytes(facts: ModelFacts, regime: Regime, batch: int) -> int:
    """The loss's transient at the start of backward: log-softmax output, the cross-entropy's
    gradient and log-softmax's gradient, all fp32 over the ``k`` kept positions (k = s here).

    The fused loss (objectives/fused_ce.py) instead holds one chunk's fp32 logits, their shifted copy
    and the probabilities (``12·c·V``) beside the hidden-state gradient it writes and the copy autograd
    makes of it for the caller (``2·k·h`` in the compute dtype; measured with live bytes) and, when
    the head trains, an fp32 weight gradient (``4·V·h``)."""
    tokens, vocab, hidden = batch * regime.seq_len, facts.arch.vocab, facts.arch.hidden
    if not regime.fused_loss:
        return 12 * tokens * vocab
    from tunelab.objectives.fused_ce import chunk_tokens_for  # noqa: PLC0415

    chunk = min(chunk_tokens_for(tokens, hidden, vocab), tokens)
    head = 4 * vocab * hidden if facts.head_trains else 0
    return 12 * chunk * vocab + 2 * tokens * hidden * regime.compute_bytes + head


def checkpointed_layers(layers: int, regime: Regime) -> int:
    """How many decoder layers run under the checkpoint: layers 0, k, 2k, ... (transformers'
    ``every_n_layers``), none without checkpointing."""
    return math.ceil(layers / regime.checkpoint_every) if regime.checkpointing else 0


def offloaded_bytes(facts: ModelFacts, regime: Regime, batch: int) -> int:
    """Host memory the offloaded layer inputs take for one micro-batch (0 without offload)."""
    if not regime.offload:
        return 0
    tokens = batch * regime.seq_len
    return checkpointed_layers(facts.arch.layers, regime) * tokens * regime.compute_bytes * facts.arch.hidden


def activation_terms(facts: ModelFacts, regime: Regime, batch: int) -> dict[str, int]:
    """Saved activations of one micro-batch on the device, and the larger of the backward transients."""
    arch, tokens = facts.arch, batch * regime.seq_len
    per_layer = sum(layer_bytes_per_token(facts, regime).values()) * tokens
    # outside the layers: final norm (fp32 upcast), rotary cos/sin, ids/masks; the head keeps its
    # input only if it trains
    outside = tokens * (4 * arch.hidden + 2 * regime.compute_bytes * arch.head_dim + 32)
    if facts.head_trains:
        outside += tokens * regime.compute_bytes * arch.hidden
    if not regime.checkpointing:
        return {
            "activations (saved for backward)": int(arch.layers * per_layer + outside),
            "backward transient": int(logits_bytes(facts, regime, batch)),
        }
    checkpointed = checkpointed_layers(arch.layers, regime)
    layer_input = tokens * regime.compute_bytes * arch.hidden
    terms: dict[str, int] = {}
    if regime.offload:  # the inputs are in host memory; backward brings one back to recompute it
        terms["activations (outside the layers)"] = int(outside)
    else:
        terms["activations (layer inputs, checkpointed)"] = int(checkpointed * layer_input + outside)
    if checkpointed < arch.layers:
        terms["activations (layers not checkpointed)"] = int((arch.layers - checkpointed) * per_layer)
    # recomputing one layer in backward holds its activations plus two hidden-state gradients
    recompute = per_layer + 2 * tokens * 4 * arch.hidden + (layer_input if regime.offload else 0)
    terms["backward transient"] = int(max(logits_bytes(facts, regime, batch), recompute))
    return terms


# ---------------------------------------------------------------- states and the peak


def optimizer_state_bytes(facts: ModelFacts, optimizer: str) -> int:
    """AdamW's two moments: in the parameters' dtype (torch), 1 byte + blockwise absmax (bnb 8-bit),
    or fp32 (bnb paged 32-bit)."""
    if optimizer == "paged_adamw_8bit":
        return int(facts.trainable_params * 2 * (1 + 4 / 256))
    if optimizer == "paged_adamw_32bit":
        return facts.trainable_params * 8
    return 2 * facts.trainable_bytes


def optimizer_step_transient(facts: ModelFacts, regime: Regime) -> int:
    """torch AdamW on CUDA runs foreach kernels: one temporary the size of all second moments; on
    CPU the per-tensor loop needs one the size of the largest parameter."""
    if regime.optimizer != "adamw":
        return facts.largest_trainable_bytes
    return facts.trainable_bytes if regime.device == "cuda" else facts.largest_trainable_bytes


def estimate(facts: ModelFacts, regime: Regime, batch: int) -> tuple[dict[str, int], int]:
    """Components and the predicted peak of allocated bytes for micro-batch ``batch``.

    Peak = weights + optimizer states + max(backward peak, optimizer-step peak): activations are
    gone by the optimizer step, gradients are absent at the start of backward (unless accumulated
    from an earlier micro-batch, or the head's, which arrives first).
    """
    grads = facts.trainable_bytes
    states = optimizer_state_bytes(facts, regime.optimizer)
    acts = activation_terms(facts, regime, batch)
    components = {"weights": facts.weight_bytes, "gradients": grads, "optimizer states": states, **acts}
    if regime.autocast and facts.param_bytes == 4:
        # autocast caches a half-precision copy of every trainable fp32 weight for the whole forward
        components["autocast weight copies"] = facts.trainable_params * 2
    step = optimizer_step_transient(facts, regime)
    components["optimizer step transient"] = step
    early_grads = grads if regime.grad_accum > 1 else facts.head_grad_bytes
    backward = early_grads + sum(acts.values()) + components.get("autocast weight copies", 0)
    peak = facts.weight_bytes + states + max(backward, grads + step)
    return components, int(peak)


def flops_per_token(facts: ModelFacts, regime: Regime) -> float:
    """Training FLOPs per token: 2N forward, 2N input gradients, 2N weight gradients (full only),
    2N recompute with checkpointing; the head over the kept positions; causal attention."""
    arch = facts.arch
    head = 2 * arch.hidden * arch.vocab
    base_trains = any(x.trains for x in facts.linears.values())
    passes = 3 if base_trains else 2
    # each checkpointed layer runs its forward a second time in backward
    passes += checkpointed_layers(arch.layers, regime) / arch.layers
    attention = 2 * arch.layers * arch.hidden * regime.seq_len  # QK^T and AV, causal half, forward
    return passes * 2 * facts.matmul_params + 3 * head + (passes * attention)


# ---------------------------------------------------------------- from a recipe


@dataclass(frozen=True)
class PlanInputs:
    """Everything :func:`estimate` needs besides the micro-batch (the meta model is built once)."""

    facts: ModelFacts
    regime: Regime
    model: str
    method: str
    gpu: Gpu | None
    capacity: int | None
    notes: tuple[str, ...]


def plan_inputs(
    recipe: Any, gpu: Gpu | None = None, *, device: str | None = None, config: Any = None
) -> PlanInputs:
    """Read a recipe into facts and a regime for ``gpu`` (a table entry), or for ``device``
    (``cuda``: the visible GPU's free memory; ``cpu``: system RAM). Default: the visible device.
    ``config`` (a transformers config) replaces the recipe's model, e.g. a shape built in code."""
    device = "cuda" if gpu is not None else (device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = gpu.supports_bf16 if gpu is not None else (device == "cuda" and torch.cuda.is_bf16_supported())
    half = torch.bfloat16 if bf16 else torch.float16
    spec = recipe.model.name_or_path
    notes: list[str] = []
    dtype = _model_dtype(recipe.model.dtype, device, half)
    if config is None:
        if spec.startswith("tiny:"):
            dtype = torch.float32  # the tiny model is always built in fp32
        config = model_config(spec, trust_remote_code=recipe.model.trust_remote_code)
    model = prepared_on_meta(config, recipe.method, dtype)
    facts = model_facts(model, config, double_quant=getattr(recipe.method, "double_quant", True))
    fast = _planned_fast_path(recipe, device, config)
    attention, packing = fast.attention, fast.packing
    why = "; ".join(f"auto: {w}" for w in (fast.attention_why, fast.packing_why) if w)
    notes.append(
        f"attention: {attention or 'the model default (sdpa)'}; packing: {'on' if packing else 'off'}"
        + (f" ({why})" if why else "")
    )
    mixed = recipe.training.mixed_precision
    autocast = device == "cuda" and mixed != "no"
    compute = 2 if (dtype != torch.float32 or autocast) else 4
    regime = Regime(
        device=device,
        compute_bytes=compute,
        autocast=autocast,
        optimizer=getattr(recipe.method, "optimizer", "adamw"),
        checkpointing=recipe.training.gradient_checkpointing,
        dense_mask=attention not in VARLEN_ATTENTION,
        seq_len=recipe.data.max_length,
        grad_accum=recipe.training.grad_accum,
        fused_loss=bool(getattr(recipe.objective, "fused_cross_entropy", False))
        or _liger_loss_planned(recipe, device, config),
        checkpoint_every=recipe.training.checkpoint_every or 1,
        offload=recipe.training.offload_activations and device != "cpu",
    )
    if recipe.training.offload_activations and device == "cpu":
        notes.append("offload_activations: a CPU run keeps activations in host memory anyway; nothing moves")
    if not facts.llama_shaped:
        notes.append(
            "activation terms assume a Llama-shaped layer (q/k/v/o, gate/up/down); this model differs"
        )
    if recipe.objective.name != "sft":
        notes.append(
            f"objective {recipe.objective.name}: planned as SFT over the same tokens (pairwise objectives run "
            "two sequences per example, so halve the suggested micro-batch)"
        )
    capacity = gpu.memory_bytes if gpu is not None else _visible_capacity(device)
    return PlanInputs(facts, regime, spec, recipe.method.name, gpu, capacity, tuple(notes))


def _planned_fast_path(recipe: Any, device: str, config: Any) -> FastPath:
    """Attention and packing as the run will resolve them (``Recipe.fast_path``). A plan for a GPU
    made elsewhere keeps an explicit kernel this machine could not run (flash-attn not installed
    here): the plan is for the machine that will."""
    try:
        return recipe.fast_path(device, config)
    except AttentionUnavailable:
        attention = recipe.model.attention
        packs = OBJECTIVES.get(recipe.objective.name).impl.packs
        return FastPath(attention, packing_in_effect(recipe.data.packing, packs, attention))


def _liger_loss_planned(recipe: Any, device: str, config: Any) -> bool:
    """``training.kernels`` auto or liger on CUDA: the SFT loss goes through Liger's fused linear
    cross-entropy (no whole logits tensor) where liger-kernel has kernels for this model type, as
    ``train/speed.py`` decides at run time. (Found by name here: the plan does not import train.)
    Without it the plan counted the whole logits of a packed batch: 27 GiB predicted against 5.8
    measured for the 1B LoRA benchmark on an H200."""
    kernels = recipe.training.kernels
    sft = hasattr(OBJECTIVES.get(recipe.objective.name).impl, "use_liger_cross_entropy")
    if device != "cuda" or kernels == "none" or not sft:
        return False
    if kernels == "liger":
        return True
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        module = importlib.import_module("liger_kernel.transformers")
    except ImportError:
        return False
    return hasattr(module, f"apply_liger_kernel_to_{getattr(config, 'model_type', '')}")


def _model_dtype(choice: str, device: str, half: torch.dtype) -> torch.dtype:
    if choice == "auto":
        return half if device == "cuda" else torch.float32
    from tunelab.models.load import resolve_dtype  # noqa: PLC0415

    return resolve_dtype(choice, "cpu")


def _visible_capacity(device: str) -> int | None:
    """Free memory of the visible GPU, or available system RAM on CPU."""
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def plan_for(inputs: PlanInputs, micro_batch: int) -> MemoryPlan:
    """The full plan at one micro-batch size."""
    components, peak = estimate(inputs.facts, inputs.regime, micro_batch)
    overhead = CUDA_CONTEXT_BYTES if inputs.regime.device == "cuda" else 0
    per_token = flops_per_token(inputs.facts, inputs.regime)
    step_time = None
    if inputs.gpu is not None:
        tokens = micro_batch * inputs.regime.seq_len * inputs.regime.grad_accum
        step_time = per_token * tokens / (inputs.gpu.half_tflops * 1e12 * ASSUMED_MFU)
    return MemoryPlan(
        model=inputs.model,
        method=inputs.method,
        device=inputs.gpu.name if inputs.gpu else inputs.regime.device,
        micro_batch=micro_batch,
        seq_len=inputs.regime.seq_len,
        components=components,
        peak_allocated=peak,
        device_total=peak + overhead,
        capacity=inputs.capacity,
        step_time_s=step_time,
        flops_per_token=per_token,
        notes=list(inputs.notes),
        host_bytes=offloaded_bytes(inputs.facts, inputs.regime, micro_batch),
    )


def largest_micro_batch(inputs: PlanInputs, capacity: int | None = None) -> int:
    """The largest micro-batch whose plan fits ``capacity`` (default: the plan's), by doubling then
    bisection (memory grows monotonically with the batch); 0 when not even one sequence fits."""
    capacity = capacity if capacity is not None else inputs.capacity
    if capacity is None:
        raise ValueError("no memory capacity known: pass --gpu NAME")

    def fits(b: int) -> bool:
        return plan_for(inputs, b).device_total <= capacity * FIT_HEADROOM

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_SEARCH_BATCH and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return min(low, MAX_SEARCH_BATCH)


# ---------------------------------------------------------------- presentation


def _unit(peak: int) -> tuple[str, int]:
    return ("GiB", GIB) if peak >= GIB else ("MiB", 1024**2)


def plan_table(plan: MemoryPlan, largest: int | None) -> Any:
    """A rich table: each component, the predicted peak, what must fit, and the suggestion."""
    from rich.table import Table  # noqa: PLC0415

    from tunelab.console import styled  # noqa: PLC0415

    table = Table(
        title=f"memory plan: {plan.method} on {plan.model}, micro-batch {plan.micro_batch} × {plan.seq_len} "
        f"tokens, {plan.device}",
        caption="peak = weights + optimizer states + max(backward peak, optimizer-step peak); "
        "not every component is alive at the peak",
    )
    unit, size = _unit(plan.peak_allocated)

    def gib(n: float) -> str:
        return f"{n / size:.2f}"

    table.add_column("component")
    table.add_column(unit, justify="right")
    for name, value in plan.components.items():
        table.add_row(name, gib(value))
    table.add_section()
    table.add_row(styled("predicted peak allocated", "bold"), styled(gib(plan.peak_allocated), "bold"))
    if plan.device_total != plan.peak_allocated:
        table.add_row("+ CUDA context", gib(plan.device_total - plan.peak_allocated))
    if plan.capacity is not None:
        verdict = styled("fits", "green") if plan.fits else styled("does not fit", "red")
        table.add_row(
            f"device memory (×{FIT_HEADROOM} headroom)",
            styled(f"{gib(plan.capacity * FIT_HEADROOM)} ", "") + verdict,
        )
    if plan.host_bytes:
        table.add_row("host memory (offloaded layer inputs)", gib(plan.host_bytes))
    if largest is not None:
        table.add_row("largest micro-batch that fits", str(largest))
    if plan.step_time_s is not None:
        table.add_row(f"step time (at {ASSUMED_MFU:.0%} MFU)", f"{plan.step_time_s:.2f} s")
    return table


def plan_report(recipe: Any, gpu_name: str | None, micro_batch: int | None) -> tuple[MemoryPlan, int | None]:
    """What `tunelab plan` prints: the plan at the recipe's micro-batch and the largest that fits."""
    from tunelab.plan.gpus import gpu_named  # noqa: PLC0415

    gpu = gpu_named(gpu_name) if gpu_name else None
    inputs = plan_inputs(recipe, gpu)
    batch = recipe.training.batch_size
    size = micro_batch or (batch if isinstance(batch, int) else 8)
    largest = largest_micro_batch(inputs) if inputs.capacity is not None else None
    return plan_for(inputs, size), largest
