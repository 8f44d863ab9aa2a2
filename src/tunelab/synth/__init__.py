"""Making data: generation (Self-Instruct, augmentation), judging and constitutional revision.

Everything here talks to a model through :mod:`tunelab.synth.client` and ends with the closing
audit of :mod:`tunelab.synth.finish`. ``data``, ``models`` and ``runs`` never import this package.
"""
