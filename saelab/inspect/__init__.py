"""`saelab inspect`: collect per-latent examples and statistics, and write a static feature browser.

from saelab.inspect import InspectConfig, collect_features, write_site

data = collect_features(model, sae, token_batches, cfg=InspectConfig(total_tokens=100_000))
data.examples(5)          # latent 5's top activating contexts
write_site(data, "inspect/")   # open inspect/index.html in a browser
"""

from saelab.inspect.collect import collect_features
from saelab.inspect.config import InspectConfig
from saelab.inspect.data import Example, FeatureData
from saelab.inspect.site import write_site

__all__ = ["Example", "FeatureData", "InspectConfig", "collect_features", "write_site"]
