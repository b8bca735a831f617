"""The drop-in that makes the `hello` family visible to bsscihub (twisted.plugin looks here).

Kept tiny: the family itself lives in the hello_family package.
"""

from hello_family import HelloFamily

hello = HelloFamily()
