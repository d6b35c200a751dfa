from setuptools import find_packages, setup

setup(
    name="pydlit",
    version="2.0.0",
    description="Daemon-less container image distribution: one registry to many, over the Registry HTTP API V2",
    packages=find_packages(include=["pydlit", "pydlit.*"]),
    package_data={"pydlit": ["migrations/*.sql"]},
    python_requires=">=3.10",
    install_requires=[
        "aiohttp>=3.9",
        "aiosqlite>=0.19",
        "jsonschema>=4.18",
        "prometheus-client>=0.17",
        "cryptography>=41",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-aiohttp>=1.0",
            "aioresponses>=0.7.6",
            "bcrypt>=4",
            "schemathesis>=4",
            "openapi-spec-validator>=0.7",
        ],
    },
    entry_points={"console_scripts": ["pydlit=pydlit.cli:main"]},
)
