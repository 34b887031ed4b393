"""Where the offline VLM builders used to live: re-exports of :mod:`crvlm_core.models.tiny_vlms`,
:mod:`crvlm_core.models.llava` and :mod:`crvlm_core.models.vlm_parts` until every importer names the defining module."""

from crvlm_core.models.llava import LLAVA_AROUND_BUILD, build_llava_around  # re-export; integration rewrites importers
from crvlm_core.models.tiny_vlms import TINY_FAMILIES, _llama_text_config, _tiny_tokenizer, build_tiny_vlm  # re-export; integration rewrites importers
from crvlm_core.models.vlm_parts import VLMParts, wrap_chat_template  # re-export; integration rewrites importers
from crvlm_core.models.vlm_parts import add_special_tokens as _add_special  # re-export; integration rewrites importers

__all__ = ["LLAVA_AROUND_BUILD", "TINY_FAMILIES", "VLMParts", "build_llava_around", "build_tiny_vlm",
           "wrap_chat_template"]
