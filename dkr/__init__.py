"""dkr: pull container images into ready root file systems."""
__version__ = "0.1.0"
