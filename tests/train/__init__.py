"""Tests of lorakit.train and the CLI."""
