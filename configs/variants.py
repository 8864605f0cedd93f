"""Parses config arguments of the form `key=value,key=value` (`--config=FILE.py:ARGS`)."""


def parse(arg: str, allowed: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """{key: value} from 'k=v,k=v', each key and value checked against `allowed`.

  Keys not given take the first allowed value (the default).
  """
  chosen = {key: values[0] for key, values in allowed.items()}
  for item in filter(None, (part.strip() for part in arg.split(','))):
    key, sep, value = item.partition('=')
    if not sep or key not in allowed:
      raise ValueError(
        f'Config argument {item!r} is not key=value with key in {sorted(allowed)}.'
      )
    if value not in allowed[key]:
      raise ValueError(f'{key}={value!r}: choose one of {list(allowed[key])}.')
    chosen[key] = value
  return chosen
