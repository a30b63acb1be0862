"""Small random checkpoints of several architectures, for tests that need no training."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=8, tie_word_embeddings=True),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
}


def random_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


def perturb(model, scale: float = 1e-3, seed: int = 1, frozen: tuple[str, ...] = ()):
    """A 'fine-tune': every parameter moves by Gaussian noise, except names containing `frozen`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(f in name for f in frozen):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def save_pair(root: Path, model_type: str = "llama", scale: float = 1e-3, frozen: tuple[str, ...] = ()) -> tuple[Path, Path]:
    base = random_model(model_type)
    base.save_pretrained(root / "base")
    perturb(base, scale, frozen=frozen).save_pretrained(root / "ft")
    return root / "base", root / "ft"
