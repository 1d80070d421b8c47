"""The application: the ``lightning-qat`` CLI, the embedded digits data and image classifier, image folders."""
