"""Drop-in package for device-family plugins, searched with twisted.plugin.getPlugins.

Third parties add a family by dropping a module that exposes an IFamily provider here
(or in a `bsscihub/plugins/` directory of their own installed package).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
