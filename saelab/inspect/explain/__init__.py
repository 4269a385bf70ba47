"""Explanations of latents (auto-interpretability): a language model writes one from a latent's examples on a
written site, and it is scored on held-out examples (detection, fuzzing); or they are imported from JSON.

    from saelab.inspect.explain import ExplainConfig, OpenAIClient, explain_site
    explain_site("outputs/run/inspect", OpenAIClient("http://localhost:8000/v1", "my-model"), ExplainConfig())
"""

from saelab.inspect.explain.clients import HFClient, OpenAIClient, make_client
from saelab.inspect.explain.config import ExplainConfig
from saelab.inspect.explain.run import explain_site, import_explanations

__all__ = ["ExplainConfig", "HFClient", "OpenAIClient", "explain_site", "import_explanations", "make_client"]
