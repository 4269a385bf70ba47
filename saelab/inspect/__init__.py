"""`saelab inspect`: collect per-latent examples and statistics, and write a feature browser.

from saelab.inspect import InspectConfig, collect_features, write_site

data = collect_features(model, sae, token_batches, cfg=InspectConfig(total_tokens=100_000))
data.examples(5)          # latent 5's top activating contexts; data.bands(5): by activation interval
write_site(data, "inspect/")   # open inspect/index.html in a browser

Layout: `collect` (streaming pass, with `tables` and `weights`) -> `data.FeatureData` -> `site` (static files,
`static/`) -> `site_reader` (read back) -> `explain` (explanations); `live` + `server` serve the site with a
text box that runs the model and the SAE.
"""

from saelab.inspect.collect import collect_features
from saelab.inspect.config import InspectConfig
from saelab.inspect.data import Band, Example, FeatureData
from saelab.inspect.site import write_site

__all__ = ["Band", "Example", "FeatureData", "InspectConfig", "collect_features", "write_site"]
