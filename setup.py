from setuptools import find_packages, setup

setup(
    name="construct",
    version="0.1.0",
    description="End-to-end-encrypted messaging relay on Twisted",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py (it must not), so find_packages cannot see it.
    packages=find_packages(include=["construct", "construct.*"]) + ["twisted.plugins"],
    package_data={
        "construct.storage": ["schema/*.sql"],
        "construct.http": ["openapi.json", "camouflage_site/*"],
        # The web client, built files included (webclient/build.mjs vendors libsodium).
        "construct.web": ["static/*.html", "static/*.css", "static/*.svg", "static/js/*.mjs", "static/vendor/*"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "autobahn[twisted]>=24.4",
        "hiredis>=2.1",
        "psycopg2-binary>=2.9",
        "pynacl>=1.5",
        "bcrypt>=4.1",
        "service-identity>=24.1",
        "klein>=24.8",
        "msgpack>=1.0",
        "orjson>=3.8",
        "prometheus-client>=0.20",
    ],
    entry_points={
        "console_scripts": [
            "construct-admin = construct.admin:main",
            "construct-bench = construct.bench.cli:main",
            "construct-chat = construct.client.cli:main",
        ]
    },
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "treq>=24.9",
            "hypothesis>=6.100",
            "schemathesis>=4.0,<5",
            "openapi-spec-validator>=0.7",
            # Drives Debian's chromium (/usr/bin/chromium) in the web client's end-to-end tests.
            "playwright>=1.40",
        ],
    },
)
