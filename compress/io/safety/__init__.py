"""What keeps a model file from running code, hanging or exhausting memory while it is read.

- `pickle`: torch's weights-only unpickler; refusals name the globals a pickle wanted;
- `zip`: the archives torch writes, checked entry by entry before torch's own reader sees them;
- `pt2`, `pt2_policy`: a `.pt2` program's payloads, JSON strings and graph, checked before torch
  turns them into code.
"""
