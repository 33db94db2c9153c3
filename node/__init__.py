"""DICOM networking and orchestration: config, SCP, CLI."""

__version__ = "0.1.0"
