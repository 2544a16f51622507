"""The bundled recipes: installed as the package `moebench.recipes` (see moebench/bundled.py)."""
