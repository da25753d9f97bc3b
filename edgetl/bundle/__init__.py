"""The bundle: the contract between the workstation and the device (stdlib + NumPy only).

- :mod:`.reader`: :func:`open_bundle` and :class:`Bundle` (verified manifest, hashed files, zips)
- :mod:`.writer`: :class:`BundleWriter`, the one writer (the exporter and ``device export``)
- :mod:`.selftest`: the reference photos a bundle carries, checked on each new CPU
"""

from .reader import BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST, ROLES, Bundle, manifest_digest, open_bundle
from .writer import BundleWriter, head_file_for, replay_file_for, zip_bundle

__all__ = ["BUNDLE_FORMAT", "FORMAT_VERSION", "MANIFEST", "ROLES", "Bundle", "BundleWriter", "head_file_for",
           "manifest_digest", "open_bundle", "replay_file_for", "zip_bundle"]
