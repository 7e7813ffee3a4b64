package org.lucerna.fhirpeer;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.parser.StrictErrorHandler;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import com.fasterxml.jackson.databind.ObjectMapper;
import jakarta.servlet.DispatcherType;
import jakarta.servlet.Filter;
import jakarta.servlet.FilterChain;
import jakarta.servlet.ServletException;
import jakarta.servlet.ServletRequest;
import jakarta.servlet.ServletResponse;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Deque;
import java.util.EnumSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.eclipse.jetty.ee10.servlet.FilterHolder;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r4.model.DiagnosticReport;
import org.hl7.fhir.r4.model.Device;
import org.hl7.fhir.r4.model.DocumentReference;
import org.hl7.fhir.r4.model.Encounter;
import org.hl7.fhir.r4.model.Endpoint;
import org.hl7.fhir.r4.model.ImagingStudy;
import org.hl7.fhir.r4.model.Media;
import org.hl7.fhir.r4.model.Observation;
import org.hl7.fhir.r4.model.Organization;
import org.hl7.fhir.r4.model.Patient;
import org.hl7.fhir.r4.model.Practitioner;
import org.hl7.fhir.r4.model.PractitionerRole;
import org.hl7.fhir.r4.model.Provenance;
import org.hl7.fhir.r4.model.ServiceRequest;

/**
 * A second, independent FHIR R4 server for Lucerna's tests: HAPI FHIR's plain server on Jetty with
 * every resource in memory (nothing survives a restart).
 *
 * <pre>
 * java -jar fhir-peer.jar [--port 8091] [--host 127.0.0.1]     (or FHIR_PEER_PORT / FHIR_PEER_HOST)
 *
 * /fhir                 R4: read, vread, create, update (client ids), delete, history, search
 *                       (all, _id), metadata, and transaction Bundles posted to the base
 * POST /admin/fail      ?status=503[&amp;count=N][&amp;retry_after=S]: the next N (default: all)
 *                       /fhir requests answer that status with an OperationOutcome
 * POST /admin/delay     ?ms=N: every /fhir request waits N ms first (0: none)
 * POST /admin/ok        ends failures and delays
 * POST /admin/reset     forgets every resource, failure, delay and recorded request
 * GET  /admin/requests  the /fhir requests seen, oldest first (method, path, query, status, headers)
 * </pre>
 */
public final class FhirPeer {
    private static final List<Class<? extends IBaseResource>> TYPES = List.of(
            Patient.class, ImagingStudy.class, Endpoint.class, Device.class, Observation.class,
            DiagnosticReport.class, Provenance.class, Organization.class, Practitioner.class,
            PractitionerRole.class, ServiceRequest.class, Encounter.class, Media.class, DocumentReference.class);
    private static final int RECORDED_REQUESTS = 1000;

    private FhirPeer() {}

    public static void main(String[] args) throws Exception {
        // HAPI logs every stored resource at INFO; warnings are what a test log needs.
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel",
                System.getProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn"));
        Map<String, String> options = options(args);
        String host = options.getOrDefault("host", env("FHIR_PEER_HOST", "127.0.0.1"));
        int port = Integer.parseInt(options.getOrDefault("port", env("FHIR_PEER_PORT", "8091")));

        FhirContext context = FhirContext.forR4();
        // A real server refuses what the spec forbids (unknown elements, bad values); so does this one.
        context.setParserErrorHandler(new StrictErrorHandler());
        Storage storage = new Storage(context, TYPES);
        Switches switches = new Switches();

        RestfulServer fhir = new RestfulServer(context);
        fhir.setServerName("Lucerna fhir-peer");
        fhir.setImplementationDescription("In-memory FHIR R4 server for Lucerna's tests");
        fhir.setDefaultResponseEncoding(EncodingEnum.JSON);
        fhir.setResourceProviders(new ArrayList<>(storage.providers()));
        fhir.registerProvider(storage.transactionProvider());

        ServletContextHandler handler = new ServletContextHandler();
        handler.setContextPath("/");
        handler.addServlet(new ServletHolder("fhir", fhir), "/fhir/*");
        handler.addServlet(new ServletHolder("admin", new Admin(storage, switches)), "/admin/*");
        handler.addFilter(new FilterHolder(new Faults(switches)), "/fhir/*", EnumSet.of(DispatcherType.REQUEST));

        Server server = new Server();
        ServerConnector connector = new ServerConnector(server);
        connector.setHost(host);
        connector.setPort(port);
        server.addConnector(connector);
        server.setHandler(handler);
        server.setStopAtShutdown(true);
        server.start();
        System.out.println("fhir-peer: FHIR R4 at http://" + host + ":" + port + "/fhir");
        server.join();
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static Map<String, String> options(String[] args) {
        Map<String, String> options = new LinkedHashMap<>();
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            if (!arg.equals("--port") && !arg.equals("--host") || i + 1 >= args.length) {
                System.err.println("usage: java -jar fhir-peer.jar [--port N] [--host ADDRESS]");
                System.exit(2);
            }
            options.put(arg.substring(2), args[++i]);
        }
        return options;
    }

    /** The failure switch, delay and request record the admin endpoints set and read. */
    static final class Switches {
        private int failStatus;
        private int failRemaining;
        private String retryAfter;
        private long delayMs;
        private final Deque<Map<String, Object>> requests = new ArrayDeque<>();

        synchronized void fail(int status, int count, String retryAfter) {
            this.failStatus = status;
            this.failRemaining = count;
            this.retryAfter = retryAfter;
        }

        synchronized void delay(long ms) {
            this.delayMs = ms;
        }

        synchronized void ok() {
            failStatus = 0;
            delayMs = 0;
        }

        synchronized void reset() {
            ok();
            requests.clear();
        }

        synchronized long delayMs() {
            return delayMs;
        }

        /** The status to fail the next request with, or 0 to serve it; counts a limited failure down. */
        synchronized int takeFailure() {
            if (failStatus == 0) {
                return 0;
            }
            int status = failStatus;
            if (failRemaining > 0 && --failRemaining == 0) {
                failStatus = 0;
            }
            return status;
        }

        synchronized String retryAfter() {
            return retryAfter;
        }

        synchronized void record(Map<String, Object> request) {
            if (requests.size() == RECORDED_REQUESTS) {
                requests.removeFirst();
            }
            requests.addLast(request);
        }

        synchronized List<Map<String, Object>> requests() {
            return new ArrayList<>(requests);
        }
    }

    /** In front of /fhir: records each request and applies the injected delay or failure. */
    static final class Faults implements Filter {
        private static final byte[] INJECTED_FAILURE = ("{\"resourceType\":\"OperationOutcome\",\"issue\":["
                + "{\"severity\":\"error\",\"code\":\"transient\","
                + "\"diagnostics\":\"failure injected by POST /admin/fail\"}]}").getBytes(StandardCharsets.UTF_8);
        private final Switches switches;

        Faults(Switches switches) {
            this.switches = switches;
        }

        @Override
        public void doFilter(ServletRequest req, ServletResponse res, FilterChain chain)
                throws IOException, ServletException {
            HttpServletRequest request = (HttpServletRequest) req;
            HttpServletResponse response = (HttpServletResponse) res;
            long delay = switches.delayMs();
            if (delay > 0) {
                try {
                    Thread.sleep(delay);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
            int failure = switches.takeFailure();
            if (failure != 0) {
                String retryAfter = switches.retryAfter();
                if (retryAfter != null) {
                    response.setHeader("Retry-After", retryAfter);
                }
                response.setStatus(failure);
                response.setContentType("application/fhir+json;charset=utf-8");
                response.getOutputStream().write(INJECTED_FAILURE);
            } else {
                chain.doFilter(req, res);
            }
            Map<String, Object> seen = new LinkedHashMap<>();
            seen.put("method", request.getMethod());
            seen.put("path", request.getRequestURI());
            seen.put("query", request.getQueryString());
            seen.put("status", response.getStatus());
            Map<String, String> headers = new LinkedHashMap<>();
            for (String name : List.of("Content-Type", "Accept", "Authorization", "Prefer", "If-Match")) {
                if (request.getHeader(name) != null) {
                    headers.put(name, request.getHeader(name));
                }
            }
            seen.put("headers", headers);
            switches.record(seen);
        }
    }

    /** The test-only control endpoints under /admin. */
    static final class Admin extends HttpServlet {
        private final transient Storage storage;
        private final transient Switches switches;
        private final transient ObjectMapper json = new ObjectMapper();

        Admin(Storage storage, Switches switches) {
            this.storage = storage;
            this.switches = switches;
        }

        @Override
        protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {
            if (!"/requests".equals(request.getPathInfo())) {
                answer(response, HttpServletResponse.SC_NOT_FOUND, "no such admin endpoint");
                return;
            }
            response.setContentType("application/json");
            json.writeValue(response.getOutputStream(), switches.requests());
        }

        @Override
        protected void doPost(HttpServletRequest request, HttpServletResponse response) throws IOException {
            try {
                switch (String.valueOf(request.getPathInfo())) {
                    case "/fail" -> {
                        int status = Integer.parseInt(request.getParameter("status"));
                        if (status < 400 || status > 599) {
                            throw new IllegalArgumentException("status must be 4xx or 5xx");
                        }
                        String count = request.getParameter("count");
                        switches.fail(status, count == null ? 0 : Integer.parseInt(count),
                                request.getParameter("retry_after"));
                    }
                    case "/delay" -> switches.delay(Long.parseLong(request.getParameter("ms")));
                    case "/ok" -> switches.ok();
                    case "/reset" -> {
                        storage.clear();
                        switches.reset();
                    }
                    default -> {
                        answer(response, HttpServletResponse.SC_NOT_FOUND, "no such admin endpoint");
                        return;
                    }
                }
            } catch (IllegalArgumentException e) {
                answer(response, HttpServletResponse.SC_BAD_REQUEST, "bad parameter: " + e.getMessage());
                return;
            }
            response.setStatus(HttpServletResponse.SC_NO_CONTENT);
        }

        private static void answer(HttpServletResponse response, int status, String message) throws IOException {
            response.setStatus(status);
            response.setContentType("text/plain;charset=utf-8");
            response.getOutputStream().write((message + "\n").getBytes(StandardCharsets.UTF_8));
        }
    }
}
