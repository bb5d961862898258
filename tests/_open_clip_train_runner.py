"""Child process of tests/test_open_clip_train.py: runs open_clip_train on the given flags, either
as open_clip_train's own main ("plain") or through calrft-open-clip-train's main ("patched"),
and records every loss call at full precision (open_clip_train logs 5 significant digits).

    python _open_clip_train_runner.py plain|patched RECORD_PREFIX <open_clip_train flags>

The recorder wraps the loss that open_clip_train's main builds (its create_loss, looked up in its
module at call time), so each line of RECORD_PREFIX-rank<R>.jsonl names the class that computed
the loss (open_clip's or calrft_kernels') and every term it returned. Under torchrun each rank
writes its own file.

open_clip_train wraps its model as DistributedDataParallel(model, device_ids=[device]), which
torch accepts for GPU modules only; on these CPU gloo ranks the runner drops device_ids for CPU
devices (a shim for the test machine; everything else is open_clip_train's own)."""
import json
import os
import sys

import torch


class Recorder(torch.nn.Module):
    def __init__(self, loss, path):
        super().__init__()
        self.loss, self.path = loss, path

    def forward(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        terms = out if isinstance(out, dict) else {"loss": out}
        cls = type(self.loss)
        with open(self.path, "a") as f:
            f.write(json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}",
                                "terms": {k: v.item() for k, v in terms.items()}}) + "\n")
        return out


class CpuDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


def main():
    mode, prefix, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    import open_clip_train.main as train_main
    build = train_main.create_loss
    path = f"{prefix}-rank{os.environ.get('RANK', '0')}.jsonl"
    train_main.create_loss = lambda args: Recorder(build(args), path)
    torch.nn.parallel.DistributedDataParallel = CpuDDP
    if mode == "patched":
        from calrft_kernels.integrations.open_clip_train import main as patched_main
        patched_main(argv)
    elif mode == "plain":
        train_main.main(argv)
    else:
        sys.exit(f"mode must be plain or patched, got {mode!r}")


if __name__ == "__main__":
    main()
