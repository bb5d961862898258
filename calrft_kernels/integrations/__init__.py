"""One-call switches that put other libraries' training code on the fused ops, in the manner of
Liger-Kernel's `apply_liger_kernel_to_*`: each returns a handle that is also a context manager,
says what it replaced and restores the library exactly when undone (_patching.Patch, the one
copy of that convention).

    open_clip        calrft_kernels.integrations.open_clip.patch(): open_clip's ClipLoss,
                     SigLipLoss and DistillClipLoss (what open_clip.create_loss and
                     open_clip_train build) become the fused drop-ins of calrft_kernels.losses
    open_clip_train  `calrft-open-clip-train <open_clip_train's flags>`: open_clip_train's main
                     under that patch (torchrun: -m calrft_kernels.integrations.open_clip_train)
    transformers     calrft_kernels.integrations.transformers.apply(): Hugging Face CLIPModel,
                     SiglipModel and Siglip2Model compute return_loss=True with the fused ops,
                     and their training forwards skip the B x B logits

The submodules import the library they patch when called, not when this package is imported."""
