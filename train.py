"""Meta-train, validate, test or adapt: ``python train.py [fit|validate|test] --config ...``.

With no arguments: ``fit --config configs/sine/maml.yaml``.
"""
from lit_meta.cli import main

if __name__ == "__main__":
    main()
