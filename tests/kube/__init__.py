"""Tests against a real kube-apiserver + etcd (see conftest.py)."""
