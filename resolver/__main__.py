"""`python -m resolver` is the same CLI as the `resolver` console script."""

from resolver.cli import main

if __name__ == "__main__":
    main()
