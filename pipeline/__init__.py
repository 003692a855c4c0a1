"""mlc: multi-label image+caption classification as a feature-caching two-stage pipeline."""

__version__ = "0.2.0"
