"""hatcli: from a raw dataset to a deployable integer model for an edge accelerator."""

__version__ = "0.1.0"
