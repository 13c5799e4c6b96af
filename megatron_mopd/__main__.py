"""`python -m megatron_mopd` is the same CLI as the `mopd` console script."""

from megatron_mopd.cli import main

if __name__ == "__main__":
    main()
