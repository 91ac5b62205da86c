"""Kernel templates of the numba backend (*.py.tmpl), expanded by assemble.py."""
