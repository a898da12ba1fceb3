"""gaprune's front door (`gaprune search|export|heal|evaluate`) and the plumbing every command
shares: settings as dataclasses, flags and run files (`options`), atomic writes (`files`).

Nothing here imports torch, so that a command checks its settings before anything heavy loads.
"""
