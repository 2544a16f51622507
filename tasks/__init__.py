"""The bundled evaluation tasks: installed as the package `moebench.tasks` (see moebench/bundled.py)."""
