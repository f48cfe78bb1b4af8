"""Helpers under OpenDelta's module paths (``opendelta.utils.inspect``), for scripts that migrate."""
