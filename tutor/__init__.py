"""tutor — low-cost LLM fine-tuning, taught in notebooks and shipped as a toolkit.

Importing the package is cheap on purpose: no torch, no transformers. Each
submodule imports the heavy libraries it needs, so `tutor --help` starts fast.
"""

from tutor.offline import quiet_offline_warnings

__version__ = "0.1.0"
# Before any dependency is imported: offline warnings of dependencies never reach stderr.
quiet_offline_warnings()
