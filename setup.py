from setuptools import find_packages, setup

setup(
    name="pydlit",
    version="2.0.0",
    description="Daemon-less container image distribution: one registry to many, over the Registry HTTP API V2",
    packages=find_packages(include=["pydlit", "pydlit.*"]),
    package_data={"pydlit": ["migrations/*.sql"]},
    python_requires=">=3.10",
    install_requires=[
        "aiohttp>=3.9,<4",
        "aiosqlite>=0.19,<1",
        "jsonschema>=4.18,<5",
        "prometheus-client>=0.17,<1",
        "cryptography>=41",
    ],
    extras_require={
        # Bounded above: a fresh machine takes the newest releases, and pytest 9.2 breaks
        # schemathesis 4.32's pytest plugin ('Function' object has no attribute '_nodeid').
        "test": [
            "pytest>=7,<9.1",
            "pytest-aiohttp>=1.0",
            "aioresponses>=0.7.6",
            "bcrypt>=4",
            "schemathesis>=4,<5",
            "openapi-spec-validator>=0.7,<1",
        ],
    },
    entry_points={"console_scripts": ["pydlit=pydlit.cli:main"]},
)
