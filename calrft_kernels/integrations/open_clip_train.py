"""`calrft-open-clip-train`: open_clip_train's main with open_clip's losses on the fused ops.

    calrft-open-clip-train --train-data ... --model ViT-B-32 ...   # open_clip_train's own flags
    torchrun --nproc_per_node 8 -m calrft_kernels.integrations.open_clip_train ...

Everything but the loss is open_clip_train's: arguments, data, logging, checkpoints (see
calrft_kernels.integrations.open_clip for what the patch replaces and what it keeps).
open_clip_train's data loading needs pandas (`pip install 'calrft-kernels[open-clip-train]'`).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from .open_clip import patch

EXTRA = "calrft-kernels[open-clip-train]"


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import open_clip_train.main as train_main
    except ImportError as exc:  # open_clip_train.data imports pandas, which open_clip_torch lacks
        sys.exit(f"calrft-open-clip-train: open_clip_train cannot be imported ({exc}); install "
                 f"its dependencies with: pip install '{EXTRA}'")
    with patch() as handle:
        if os.environ.get("RANK", "0") == "0":
            print(handle.summary(), file=sys.stderr, flush=True)
        train_main.main(argv)


if __name__ == "__main__":
    main()
