"""The CPU demo's toy kit: synthetic tasks, tiny teacher/student SFT, a plain MOPD prototype."""
