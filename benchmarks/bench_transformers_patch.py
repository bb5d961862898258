"""CPU benchmark of what calrft_kernels.integrations.transformers.apply() changes for Hugging
Face users: one training step (model.train(), forward with return_loss=True, backward) of
CLIPModel and SiglipModel, unpatched and under apply() (skip_logits=True, the default).

The models are randomly initialised with towers as small as they go (one layer, one 8 x 8 patch
per image, 2 text tokens, width 32) and the embedding width d: CLIP's projection_dim, SigLIP's
tower width (SigLIP has no projection). So the step is almost all head: the logits and the loss,
which is what the patch replaces. Memory (peak extra RSS of one step, each method in its own
subprocess) and time (round-robin medians in one process) come from benchmarks/_loss_bench.py.
Unpatched models materialise B x B logits and never run above B = 16384 on this machine.

Methods: CLIPModel, SiglipModel (transformers' own forward); <name>+apply (under apply()).

    prlimit --as=$((16<<30)) python benchmarks/bench_transformers_patch.py --sizes 4096 8192 16384
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, ROOT)
from benchmarks._loss_bench import LossBench, patch_table  # noqa: E402

SIZES = (4096, 8192, 16384)
MODELS = ("CLIPModel", "SiglipModel")
METHODS = tuple(m for name in MODELS for m in (name, name + "+apply"))
# Peak extra bytes per B^2 of the unpatched steps (for skipping sizes that cannot fit): CLIP
# keeps the logits, their transpose's log-softmax in both directions and their gradients;
# SigLIP the logits, the +-1 label matrix, logsigmoid and gradients (~6 fp32 B x B buffers each).
BYTES_PER_B2 = {"CLIPModel": 4 * 7, "SiglipModel": 4 * 8}


def tiny_model(name: str, d: int):
    """A random one-layer model whose image and text embeddings have width d."""
    import torch
    import transformers
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=1, max_position_embeddings=2, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=1, image_size=8, patch_size=8)
    torch.manual_seed(0)
    if name == "CLIPModel":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=d)
    else:  # SigLIP's embeddings are its towers' pooled outputs: width d
        config = transformers.SiglipConfig(text_config={**text, "hidden_size": d},
                                           vision_config={**vision, "hidden_size": d})
    model = getattr(transformers, name)(config).train()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-10.0)
    return model


def _make_step(method, B, d, seed=0):
    import torch
    from calrft_kernels.integrations import transformers as integration

    name, patched = method.removesuffix("+apply"), method.endswith("+apply")
    model = tiny_model(name, d)
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(input_ids=torch.randint(3, 99, (B, 2), generator=gen),
                  pixel_values=torch.randn(B, 3, 8, 8, generator=gen), return_loss=True)

    def step():
        if patched:  # the patch is per class: held only while this method's step runs
            with integration.apply(models=[name]):
                out = model(**inputs)
            assert out.logits_per_text is None
        else:
            out = model(**inputs)
            assert out.logits_per_text.shape == (B, B)
        out.loss.backward()

    return step, lambda: model.zero_grad(set_to_none=True)


BENCH = LossBench(__file__, _make_step, BYTES_PER_B2)


def table(results, sizes):
    return patch_table(results, sizes, MODELS, "+apply", "model", "transformers", "step")


def main(argv=None):
    BENCH.main(argv, __doc__, table, SIZES, METHODS, reps=3, big_reps=1)


if __name__ == "__main__":
    main()
