"""Make PyPI's torchvision importable beside the CPU torch in `.venv-sglang`.

SGLang 0.5.23 imports `torchvision.transforms` at start-up. Every Linux torchvision wheel
on PyPI is a CUDA build; beside torch 2.13.0+cpu its compiled ops (`torchvision._C`) do
not load, and `torchvision/_meta_registrations.py` then fails at import with "operator
torchvision::nms does not exist", because it registers fake implementations of those ops
unconditionally. This edit registers them only when the ops loaded. SGLang never calls
them (they are detection ops: nms, roi_align, ...). Written for torchvision 0.28.0.

    python fix_torchvision.py SITE_PACKAGES/torchvision/_meta_registrations.py

Idempotent; exits non-zero if the file does not look as expected.
"""

import sys

MARK = "# megatron_mopd: fake ops only when torchvision._C loaded"
GUARD = f"""{MARK}
def _register_fake(name):
    import torchvision.extension as _ext

    return torch.library.register_fake(name) if _ext._has_ops() else (lambda fn: fn)


"""


def main(path: str) -> int:
    with open(path) as f:
        src = f.read()
    if MARK in src:
        return 0
    anchor = "def register_meta(op_name"
    if anchor not in src or "@torch.library.register_fake(" not in src:
        print(f"{path}: unexpected layout (torchvision version?); not patched", file=sys.stderr)
        return 1
    src = src.replace("@torch.library.register_fake(", "@_register_fake(")
    src = src.replace(anchor, GUARD + anchor, 1)
    with open(path, "w") as f:
        f.write(src)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
