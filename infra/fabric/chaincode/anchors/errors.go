package anchors

import (
	"errors"
	"fmt"
)

// Error kinds, matched with errors.Is; the wrapped message says exactly what was refused.
var (
	ErrInvalid      = errors.New("invalid argument")
	ErrForbidden    = errors.New("forbidden")
	ErrConflict     = errors.New("conflict")
	ErrNotFound     = errors.New("not found")
	ErrSignature    = errors.New("signature refused")
	ErrInconsistent = errors.New("inconsistent with the anchored history")
)

func kindf(kind error, format string, args ...any) error {
	return fmt.Errorf("%w: %s", kind, fmt.Sprintf(format, args...))
}

func invalidf(format string, args ...any) error { return kindf(ErrInvalid, format, args...) }

func inconsistentf(format string, args ...any) error {
	return kindf(ErrInconsistent, format, args...)
}
