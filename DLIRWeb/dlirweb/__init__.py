"""DLIR in a browser: one registration page served by trame-slicer (``dlir-web``).

A third thin GUI over ``DLIRRegistrationLib``, beside the two Slicer modules: the page calls the
same Qt-free functions as the DLIR Registration module (``prepareRegistration`` /
``registerVolumes``, the display helpers) and the engine's own file reader and writer, so the
sentences, numbers and files are those of Slicer and of ``dlir register``.

Modules: ``inputs`` (what may be registered: the sample pair, files under the served folder,
uploads; reading them into the scene), ``session`` (one registration at a time off the event
loop, the result's nodes and files, the views), ``page`` (the trame/Vuetify page), ``server``
(the command line, safe defaults, the download route, clean-up).
"""
