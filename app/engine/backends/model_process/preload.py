"""What the fork server of forked model processes imports before it forks any (see spares.FORKED).

The fork server does nothing else: no thread is started and no tensor is made before a fork, so each
process forked from it starts with these imports done and nothing running. Beyond the backend's own
warm-up: transformers' loading machinery (1.4 s more on the 2-core CI machine, paid by every load
otherwise) and the Llama modules (0.3 s; the architecture of most small FP16 models).
"""

import transformers.modeling_utils  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

from app.engine.backends.transformers_backend import TransformersBackend

TransformersBackend.warm_up(lambda fraction, message: None)
