"""omnicrm's services. Compiled hot modules are used when built: see shared.compiled."""

from shared.compiled import install

install()
