"""`tunelab studio`: the lifecycle in the browser (issue 19).

The top layer: it may import every other tunelab package and nothing imports it. Each page is a thin
shell over the same function the CLI calls (no logic lives here), and all state is on disk in the runs
directory, so restarting the studio loses nothing.
"""
