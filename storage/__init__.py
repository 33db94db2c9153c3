"""What is on disk: the file store, the SQLAlchemy index, header classification.

``storage`` never imports ``node`` or ``models``.
"""
