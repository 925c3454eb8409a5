"""The studies, one module each; importing a module registers it (see ``..study``)."""
